"""Joining the Ray cluster named by `RAY_ADDRESS`, failing fast with one sentence when it cannot be reached.

`ray.init` against an address where nothing answers retries for minutes, printing GCS warnings, and on a loopback
address it may rewrite 127.0.0.1 to the machine's external address first. So: parse the address, try a plain TCP
connection to the GCS port (a few seconds at most), say what to check if it fails; keep loopback addresses on
loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, docs/environment.md); only then call `ray.init`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile

import ray

CONNECT_TIMEOUT_S = 5.0
GCS_RETRIES = 10  # ~1 s each once the port speaks gRPC: a head that does not answer fails within ~15 s
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ClusterUnreachable(ValueError):
    """RAY_ADDRESS names no reachable Ray head (the CLI prints the message, exit 2)."""


def gcs_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address; None for the forms Ray resolves itself."""
    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"RAY_ADDRESS={address!r} is not an address of the form HOST:PORT "
                                 "(e.g. 127.0.0.1:6390, the head's --port)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    target = gcs_host_port(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            if os.environ.get("RAY_USE_TLS", "0") not in ("0", "") or _speaks_http2(conn):  # TLS: no plain preface
                return
            raise ClusterUnreachable(f"RAY_ADDRESS={address} answers but is not a Ray head (no gRPC reply): check the "
                                     "port, which must be the head's --port (default 6379), not its dashboard's")
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
            "timed out" if isinstance(exc, TimeoutError) else exc.strerror or exc.__class__.__name__)
    raise ClusterUnreachable(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({why}): check that a Ray head "
                             f"is running there (`ray status --address {host}:{port}`) and that the port is the "
                             "head's --port (default 6379), or unset RAY_ADDRESS for an embedded local run")


# A gRPC server (Ray's GCS is one) answers the HTTP/2 client preface with a SETTINGS frame (RFC 9113 section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def _speaks_http2(conn: socket.socket) -> bool:
    try:
        conn.sendall(HTTP2_PREFACE)
        header = conn.recv(9)
    except OSError:
        return False
    return len(header) >= 4 and header[3] == HTTP2_SETTINGS


def join_cluster() -> None:
    """`ray.init` on RAY_ADDRESS's cluster once it answers (raises ClusterUnreachable otherwise)."""
    address = os.environ["RAY_ADDRESS"]
    check_reachable(address)
    target = gcs_host_port(address)
    if target is not None and target[0] in LOOPBACK_HOSTS:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Something answers but may not be a Ray head: bound Ray's GCS retries (one a second, 20 by default) and keep
    # its per-retry C++ warnings off the terminal; the sentence below says what went wrong.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(GCS_RETRIES))  # read by ray.init at call time
    try:
        with _stderr_shown_only_on_success():
            ray.init(log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterUnreachable(f"RAY_ADDRESS={address} answers but Ray could not join it ({_first_line(exc)}): check "
                                 "that it is a Ray head's GCS port (the head's --port) and that the head runs the same "
                                 f"Ray version ({ray.__version__})") from None


@contextlib.contextmanager
def _stderr_shown_only_on_success():
    """Hold what Ray's C++ side writes to fd 2 (a warning per GCS retry); pass it on unless the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.buffer.write(held.read())
        sys.stderr.flush()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
