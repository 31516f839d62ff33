"""A local Ray head on loopback with its own temp dir, started and stopped by us alone.

`ray stop` finds Ray processes machine-wide by name; we stop only the head we started: it runs as
`ray start --head --block` in its own session, and stopping signals that process group. Everything stays on
127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from rewriting the address to the external one, and
every process that talks to this head needs it too: `env()` carries it). Token authentication is disabled for
this loopback-only head so the dashboard and `ray job submit` work without a token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def head_env() -> dict[str, str]:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass
class LocalHead:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    metrics_port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """Environment for processes that should talk to this head (drivers, `ray job submit`)."""
        return {**head_env(), "RAY_ADDRESS": self.gcs_address}

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)


def start_local_head(num_gpus: int, num_cpus: int = 2, gcs_port: int = 6390, dashboard_port: int = 8265,
                     metrics_port: int = 8080, temp_dir: Path | None = None, timeout_s: float = 90.0) -> LocalHead:
    """Start a head and wait until its dashboard answers; raise RuntimeError (with the log's tail) if it does not."""
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="fray-"))  # short: Ray's socket paths have a length limit
    log_path = temp_dir / "head.log"
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
           f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--dashboard-host={LOOPBACK}",
           f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}", f"--temp-dir={temp_dir}",
           # NOTE: the dashboard agent's port is fixed (52365) by default: a second Ray on the machine (a test's
           # local cluster, another head) would take it and this head's job agent would never register.
           f"--dashboard-agent-listen-port={52365 + dashboard_port - 8265 + 100}", "--disable-usage-stats"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=head_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(temp_dir, gcs_port, dashboard_port, metrics_port, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2).read()
            return head
        except OSError:
            time.sleep(0.5)
    head.stop()
    tail = log_path.read_text(errors="replace").splitlines()[-5:]
    raise RuntimeError("the local Ray head did not come up; last log lines: " + " | ".join(tail))
