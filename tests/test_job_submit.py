"""`ray job submit` of a workflow to a real local Ray head on loopback (its own temp dir and ports): the job
starts the cluster's planner service when there is none (and says so), succeeds, its outputs exist, the dashboard
lists the planner and workers by name; bad input fails the job with the validation message and no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fate_ray.runtime.job import actor_names, fate_ray, submit_run

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = "workflows/clusters/local.yaml"


@pytest.fixture(scope="module")
def head(ray_head):
    yield ray_head
    down = fate_ray(ray_head, "down")  # the service a job started outlives it; other tests need the GPUs
    assert down.returncode == 0, down.stderr


def test_a_submitted_workflow_runs_and_the_dashboard_names_its_actors(head, tmp_path):
    out = tmp_path / "out"
    proc = submit_run(head, ROOT, ["workflows/self_consistency.yaml", "--cluster", LOCAL_CLUSTER, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    started = "no fate-ray service on this cluster: started one (cluster 'local', policy fate, 2 workers)"
    assert started in proc.stdout, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == []
    rows = [json.loads(line) for line in (out / "self-consistency.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["request"]) for r in rows} == {("solve", i) for i in range(8)} | {("vote", 0)}
    names = actor_names(head)
    assert "fate-planner" in names
    assert {"fate-worker-local-gpu0", "fate-worker-local-gpu1"} <= set(names)


def test_a_bad_workflow_fails_the_job_with_the_validation_message(head, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - id: a\n    model: llama3.1-8b\n    prompt: {template: hi}\n"
                   "    max_tokens: 0\n")
    proc = submit_run(head, ROOT, [str(bad), "--cluster", LOCAL_CLUSTER])
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"error: {bad}:6: stages.0.max_tokens: Input should be greater than 0" in logs
    assert "Traceback" not in logs


def test_the_local_head_wants_its_token_and_listens_on_loopback_only(ray_head):
    """Token authentication is on: the dashboard's API refuses a request without the head's token and answers
    one with it; the token file is readable by its user only; nothing listens on the machine's other addresses."""
    import os
    import socket
    import stat
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/v0/actors?limit=10", timeout=10)
    assert refused.value.code in (401, 403)
    assert json.loads(ray_head.get("/api/v0/actors?limit=10"))["data"]
    assert stat.S_IMODE(os.stat(ray_head.token_path).st_mode) == 0o600
    others = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    others |= {a for a in os.popen("hostname -I 2>/dev/null").read().split() if "." in a}
    for address in sorted(others - {"127.0.0.1"}):
        with socket.socket() as control, socket.socket() as probe:  # the address is reachable from here at all
            control.bind(("0.0.0.0", 0))
            control.listen()
            probe.settimeout(2)
            if probe.connect_ex((address, control.getsockname()[1])) != 0:
                continue
        for port in (ray_head.dashboard_port, ray_head.metrics_port, ray_head.gcs_port):
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((address, port)) != 0, f"port {port} answers on {address}"
