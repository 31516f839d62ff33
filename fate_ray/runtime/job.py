"""`ray job submit` of a workflow run against a local head: the main job `make demo` runs."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fate_ray.runtime.local_head import LocalHead


def submit_run(head: LocalHead, working_dir: Path, run_args: Sequence[str], timeout_s: float = 600.0,
               ) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> --working-dir <dir> -- python -m fate_ray.cli run <args>`; waits.

    The entrypoint names this interpreter: the head is local and shares it (a remote cluster would say `python`).
    """
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir), "--",
           sys.executable, "-m", "fate_ray.cli", "run", *run_args]
    return subprocess.run(cmd, env=head.env(), capture_output=True, text=True, timeout=timeout_s, cwd=working_dir)


def actor_names(head: LocalHead) -> dict[str, str]:
    """Named actors the dashboard knows, name -> state."""
    with urllib.request.urlopen(f"{head.dashboard_url}/api/v0/actors?limit=1000", timeout=10) as resp:
        data = json.loads(resp.read())
    rows = data["data"]["result"]["result"]
    return {row["name"]: row["state"] for row in rows if row.get("name")}
