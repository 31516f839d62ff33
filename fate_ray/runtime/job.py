"""`ray job submit` of workflow runs, and the `fate-ray` service commands, against a local head (what `make demo`
and the tests run)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fate_ray.runtime.local_head import LocalHead

AGENT_WAIT_S = 60.0


def submit_run(head: LocalHead, working_dir: Path, run_args: Sequence[str], timeout_s: float = 600.0,
               ) -> subprocess.CompletedProcess:
    """`ray job submit --address <dashboard> --working-dir <dir> -- fate-ray run <args>`, as the README's steps
    do (the head's PATH finds this environment's `fate-ray`); waits for the job to end."""
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir), "--",
           "fate-ray", "run", *run_args]
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        proc = subprocess.run(cmd, env=head.env(), capture_output=True, text=True, timeout=timeout_s, cwd=working_dir)
        # NOTE: a head answers HTTP a few seconds before its job agent registers; that refusal is worth a retry.
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            return proc
        time.sleep(2.0)


def fate_ray(head: LocalHead, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """`fate-ray <args>` against the head (RAY_ADDRESS set), as a user's shell would run it."""
    cmd = [str(Path(sys.executable).with_name("fate-ray")), *args]
    return subprocess.run(cmd, env=head.env(), capture_output=True, text=True, timeout=timeout_s)


def actor_names(head: LocalHead) -> dict[str, str]:
    """Named actors the dashboard knows, name -> state."""
    data = json.loads(head.get("/api/v0/actors?limit=1000"))
    rows = data["data"]["result"]["result"]
    return {row["name"]: row["state"] for row in rows if row.get("name")}
