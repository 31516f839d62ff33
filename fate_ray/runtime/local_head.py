"""A local Ray head on loopback with its own temp dir, started and stopped by us alone.

`ray stop` finds Ray processes machine-wide by name; we stop only the head we started: it runs as
`ray start --head --block` in its own session, and stopping signals that process group. Everything stays on
127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from rewriting the address to the external one, and
every process that talks to this head needs it too: `env()` carries it).

Ray's token authentication stays on: the head gets a fresh random token in a file only its user can read
(`auth_token` in its temp dir, or one given), and `env()` points every process that talks to it there
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), so `ray job submit`, drivers and jobs authenticate; the dashboard's
HTTP API wants it as a bearer token (`get`). Dashboard and metrics listen on loopback only.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


class HeadError(ValueError):
    """The local head cannot start; the message says why in one sentence (the CLI prints it, exit 2)."""


def head_env(token_path: Path | None = None) -> dict[str, str]:
    """The head's environment: its jobs' entrypoints (`fate-ray run ...`) find this interpreter's scripts first,
    as they would on a head started from the project's activated environment; with `token_path`, token
    authentication with that token."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if token_path is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    return env


def write_token(path: Path) -> Path:
    """A new random token in a file only this user can read (kept if it exists: heads and clients share it)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path


@dataclass
class LocalHead:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    metrics_port: int
    process: subprocess.Popen
    log_path: Path
    token_path: Path

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
        return {**head_env(self.token_path), "RAY_ADDRESS": self.gcs_address}

    def get(self, path: str, timeout_s: float = 10.0) -> bytes:
        """GET from the dashboard's HTTP API, with the head's token."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}", headers={
            "Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.read()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)


def stop_head(temp_dir: Path, grace_s: float = 10.0) -> int:
    """Stop the Ray processes started with `--temp-dir=temp_dir` (every process whose command line names that
    folder, and their descendants), leaving other Ray instances on the machine alone; returns how many processes
    were signalled. Ray's daemons ignore SIGTERM for a while, so what is still there after `grace_s` is killed."""
    # Whole arguments only: /tmp/fray must match neither another head's /tmp/fray-abc nor /data/tmp/fray.
    exact = {f"--temp-dir={temp_dir}", f"--temp_dir={temp_dir}"}
    inside = f"{temp_dir}/"
    prefixed = tuple(f"{flag}={inside}" for flag in ("--temp-dir", "--temp_dir", "--log_dir", "--logs-dir",
                                                     "--session-dir", "--raylet_socket_name", "--store_socket_name",
                                                     "--log-dir", "--session_dir"))
    parent: dict[int, int] = {}
    targets: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            mine = proc.stat().st_uid == os.getuid()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if mine and any(a in exact or a.startswith(inside) or a.startswith(prefixed) for a in args):
            targets.add(int(proc.name))
    grew = True
    while grew:  # descendants too (the dashboard agent renames itself and no longer names the folder)
        more = {pid for pid, ppid in parent.items() if ppid in targets} - targets
        targets |= more
        grew = bool(more)
    pid = os.getpid()
    while pid > 1:  # never ourselves or a process we run under (a shell whose command line names the folder)
        targets.discard(pid)
        pid = parent.get(pid, 1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            if sig == signal.SIGKILL and not _alive(pid):
                continue  # gone after SIGTERM: its pid may already be someone else's
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in targets):
            time.sleep(0.2)
    return len(targets)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0: it is gone all the same.
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def start_local_head(num_gpus: int, num_cpus: int = 2, gcs_port: int = 6390, dashboard_port: int = 8265,
                     metrics_port: int = 8080, temp_dir: Path | None = None, timeout_s: float = 90.0,
                     token_path: Path | None = None) -> LocalHead:
    """Start a head and wait until its dashboard answers. Raises HeadError, one sentence, when it cannot start: Ray
    missing, a port taken, or the head exiting or staying silent (with the log's last line). Its token is read
    from `token_path` (written there first if missing), else a new one in its temp dir."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        raise HeadError(f"Ray is not installed in this environment (no {ray_bin}): run `make demo` (it installs the "
                        "project with Ray) or `pip install 'ray[default]'`")
    for what, port in (("GCS", gcs_port), ("dashboard", dashboard_port), ("metrics", metrics_port)):
        if _port_in_use(port):
            raise HeadError(f"cannot start a local Ray head: {LOOPBACK}:{port} (its {what} port) is in use, maybe "
                            f"by another Ray head (`ray status --address {LOOPBACK}:{gcs_port}`); stop it, e.g. "
                            "`fate-ray stop-head DIR` for a head started with --temp-dir DIR")
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="fray-"))  # short: Ray's socket paths have a length limit
    log_path = temp_dir / "head.log"
    token_path = write_token(token_path or temp_dir / "auth_token")
    cmd = [str(ray_bin), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
           f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--dashboard-host={LOOPBACK}",
           f"--dashboard-port={dashboard_port}", f"--metrics-export-port={metrics_port}", f"--temp-dir={temp_dir}",
           # NOTE: the dashboard agent's port is fixed (52365) by default: a second Ray on the machine (a test's
           # local cluster, another head) would take it and this head's job agent would never register.
           f"--dashboard-agent-listen-port={52365 + dashboard_port - 8265 + 100}", "--disable-usage-stats"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=head_env(token_path), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = LocalHead(temp_dir, gcs_port, dashboard_port, metrics_port, process, log_path, token_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            head.get("/api/version", timeout_s=2)
            return head
        except OSError:
            time.sleep(0.5)
    head.stop()
    tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
    raise HeadError(f"the local Ray head did not come up within {timeout_s:.0f} s (log {log_path}; last line: "
                    f"{tail[0].strip() if tail else 'none'})")


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((LOOPBACK, port)) == 0
