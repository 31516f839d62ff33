"""`ray job submit` of a workflow run against a local head: the main job `make demo` runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fate_ray.runtime.local_head import LocalHead

AGENT_WAIT_S = 60.0


def submit_run(head: LocalHead, working_dir: Path, run_args: Sequence[str], timeout_s: float = 600.0,
               ) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> --working-dir <dir> -- python -m fate_ray.cli run <args>`; waits.

    The entrypoint names this interpreter: the head is local and shares it (a remote cluster would say `python`).
    """
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir), "--",
           sys.executable, "-m", "fate_ray.cli", "run", *run_args]
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        proc = subprocess.run(cmd, env=head.env(), capture_output=True, text=True, timeout=timeout_s, cwd=working_dir)
        # NOTE: a head answers HTTP a few seconds before its job agent registers; that refusal is worth a retry.
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            return proc
        time.sleep(2.0)


def actor_names(head: LocalHead) -> dict[str, str]:
    """Named actors the dashboard knows, name -> state."""
    with urllib.request.urlopen(f"{head.dashboard_url}/api/v0/actors?limit=1000", timeout=10) as resp:
        data = json.loads(resp.read())
    rows = data["data"]["result"]["result"]
    return {row["name"]: row["state"] for row in rows if row.get("name")}
