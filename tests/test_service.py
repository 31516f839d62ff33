"""The planner service on real local Ray heads: the README's hand-run steps work as written (two concurrent jobs on
one service, a repeat job that loads nothing, `fate-ray status`, `fate-ray down`, stopping that head only), and
`ray job stop` cancels only the stopped job's workflows."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import ray
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from fate_ray.runtime.job import fate_ray
from fate_ray.runtime.local_head import head_env
from fate_ray.runtime.service import NAMESPACE, find_planner
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
README_HEAD_TEMP_DIR = Path("/tmp/fray")  # what the README's steps use
LOCAL_CLUSTER = "workflows/clusters/local.yaml"


def readme_steps() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- service-steps:begin -->")[1].split("<!-- service-steps:end -->")[0]
    return block.split("```sh\n")[1].split("```")[0]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_readmes_service_steps_run_as_written(tmp_path):
    """In a copy of the project (the steps write results/ under it), with this project's .venv."""
    for port in (6390, 8265):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"127.0.0.1:{port} is in use (a head started by hand from the README, or `make demo`?)")
    work = tmp_path / "project"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "results", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", ".ruff_cache"))
    (work / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    try:
        proc = subprocess.run(["bash", "-c", "set -e\n" + readme_steps()], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
    finally:
        from fate_ray.runtime.local_head import stop_head

        stop_head(README_HEAD_TEMP_DIR)
        shutil.rmtree(README_HEAD_TEMP_DIR, ignore_errors=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "started the fate-ray service: fate-planner and 8 workers in namespace 'fate'" in log
    # Both concurrent jobs completed, on the one service's workers, at the same time.
    job1, job2 = rows(work / "results/job1/rag-rerank.jsonl"), rows(work / "results/job2/mapreduce-summary.jsonl")
    assert len({(r["stage"], r["request"]) for r in job1}) == len(job1) > 0
    assert len({(r["stage"], r["request"]) for r in job2}) == len(job2) > 0
    overlap_s = (min(max(r["end_s"] for r in job1), max(r["end_s"] for r in job2))
                 - max(min(r["start_s"] for r in job1), min(r["start_s"] for r in job2)))
    assert overlap_s > 0, "the two jobs did not run at the same time"
    assert {r["workflow"].split("@")[1] for r in job1} != {r["workflow"].split("@")[1] for r in job2}
    # The repeat of job 1 found every model resident.
    assert "model loads on the service while this run ran: 0 (" in log
    assert json.loads((work / "results/job3/summary.json").read_text())["model_events_during_run"]["load"] == 0
    # The service holds one GPU per worker, however many jobs ran: the head's 8, not 16.
    assert "8.0/8.0 GPU" in log
    assert "resident models" in log and "h100-node/gpu0" in log  # `fate-ray status`
    assert "stopped 9 fate-ray actor(s)" in log
    assert "Ray process(es) of the head in /tmp/fray" in log


@pytest.fixture
def service(ray_head, ray_client):
    """The service on the session's head (local cluster: 2 devices), at the modelled pace (time scale 1: the map-reduce
    example takes ~17 s), so that a job is still midway when it is stopped however slowly the jobs start."""
    up = fate_ray(ray_head, "up", "--cluster", str(ROOT / LOCAL_CLUSTER), "--time-scale", "1")
    assert up.returncode == 0, up.stderr
    yield find_planner()
    down = fate_ray(ray_head, "down")
    assert down.returncode == 0 and "stopped 3 fate-ray actor(s)" in down.stdout, down.stdout + down.stderr
    alive = list_actors(filters=[("ray_namespace", "=", NAMESPACE), ("state", "=", "ALIVE")])
    assert alive == []


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_that_asks_for_another_policy_than_the_services_is_refused_in_one_sentence(ray_head, service):
    proc = fate_ray(ray_head, "run", str(ROOT / "workflows" / "rag_rerank.yaml"), "--policy", "heft")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the running fate-ray service plans with policy 'fate', not 'heft': omit --policy, or `fate-ray down` "
        "and `fate-ray up --policy` to change it")
    assert "Traceback" not in proc.stderr


def test_the_cli_default_time_scale_is_the_sim_engines():
    from fate_ray.cli import DEFAULT_TIME_SCALE
    from fate_ray.engines.sim_engine import DEFAULT_TIME_SCALE as ENGINE_DEFAULT

    assert DEFAULT_TIME_SCALE == ENGINE_DEFAULT


def test_ray_job_stop_cancels_only_that_jobs_workflows(ray_head, service, tmp_path):
    client = JobSubmissionClient(ray_head.dashboard_url)
    env = {"env_vars": {k: v for k, v in head_env().items() if k.startswith("RAY_ENABLE")}}
    jobs = {}
    for name, workflow in (("stopped", "mapreduce_summary"), ("kept", "rag_rerank")):
        jobs[name] = client.submit_job(
            entrypoint=f"fate-ray run workflows/{workflow}.yaml --out {tmp_path / name}",
            runtime_env={"working_dir": str(ROOT), "excludes": ["results", ".venv", ".git"], **env})

    def running_jobs() -> set[str]:
        workflows = ray.get(service.service_status.remote())["workflows"]
        return {w["job"] for w in workflows if w["state"] == "running" and w["running_shards"]}

    wait_for(lambda: len(running_jobs()) == 2, 180, "both jobs' workflows running on the service")
    assert client.stop_job(jobs["stopped"])
    wait_for(lambda: client.get_job_status(jobs["stopped"]).is_terminal(), 60,
             "the stopped job to stop: " + client.get_job_logs(jobs["stopped"])[-2000:])
    assert client.get_job_status(jobs["stopped"]) == JobStatus.STOPPED
    wait_for(lambda: client.get_job_status(jobs["kept"]).is_terminal(), 300, "the kept job to end")
    assert client.get_job_status(jobs["kept"]) == JobStatus.SUCCEEDED, client.get_job_logs(jobs["kept"])
    wf = load_workflow(ROOT / "workflows" / "rag_rerank.yaml", load_cluster(ROOT / LOCAL_CLUSTER))[1]
    kept = sorted((r["stage"], r["request"]) for r in rows(tmp_path / "kept" / "rag-rerank.jsonl"))
    assert kept == sorted((sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests))
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["failed"] == []
    # The stopped job's workflow was cancelled and forgotten: nothing of it is left queued or listed.
    wait_for(lambda: ray.get(service.service_status.remote())["workflows"] == [], 60, "the stopped job's workflow "
             "to be cancelled and forgotten")
    status = ray.get(service.service_status.remote())
    assert status["cancelled_workflows"] == 1  # cancelled, not merely finished
    assert all(d["queued"] == 0 for d in status["devices"])
    assert not (tmp_path / "stopped" / "summary.json").exists()


def test_two_services_started_at_once_with_other_settings_leave_one_and_a_sentence(ray_head, ray_client):
    """Two `fate-ray up`s at the same moment asking for different policies: one service (one planner, one worker
    per device), and the other command says which one runs, in one sentence, exit 2."""
    from concurrent.futures import ThreadPoolExecutor

    cluster = str(ROOT / LOCAL_CLUSTER)
    try:
        with ThreadPoolExecutor(2) as pool:
            procs = list(pool.map(lambda policy: fate_ray(ray_head, "up", "--cluster", cluster, "--policy", policy),
                                  ["fate", "heft"]))
        assert sorted(p.returncode for p in procs) == [0, 2], [p.stdout + p.stderr for p in procs]
        winner = ["fate", "heft"][[p.returncode for p in procs].index(0)]
        loser = next(p for p in procs if p.returncode == 2)
        assert "Traceback" not in loser.stderr
        last = loser.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"policy {winner}" in last.replace("'", ""), last
        alive = list_actors(filters=[("ray_namespace", "=", NAMESPACE), ("state", "=", "ALIVE")])
        assert sorted(a["name"] for a in alive) == ["fate-planner", "fate-worker-local-gpu0", "fate-worker-local-gpu1"]
        assert ray.get(find_planner().info.remote())["policy"] == winner
    finally:
        fate_ray(ray_head, "down")


def test_a_job_that_goes_away_while_submitting_has_its_late_workflows_cancelled(ray_client):
    """The planner heard the job's token die; workflows that job still submits are cancelled and forgotten."""
    from fate_ray.runtime.service import JobToken, ServiceConfig, start_actors

    cluster = load_cluster(ROOT / LOCAL_CLUSTER)
    planner, workers = start_actors(cluster, ServiceConfig(time_scale=1.0), name_suffix="-late")
    try:
        token = JobToken.remote()
        ray.get(planner.watch_job.remote("gone-job", token))
        ray.kill(token)
        wait_for(lambda: "gone-job" in ray.get(planner.service_status.remote())["gone_jobs"], 30,
                 "the planner to see the job's token die")
        wf = load_workflow(ROOT / "workflows" / "rag_rerank.yaml", cluster)[1]
        late = [wf.with_arrival(f"late-{k}@gone-job", 0.0) for k in range(3)]
        ids = ray.get(planner.submit.remote(late, "gone-job"))
        assert len(ids) == 3
        status = ray.get(planner.service_status.remote())
        assert status["workflows"] == [] and status["cancelled_workflows"] == 3, status
    finally:
        for handle in [planner, *workers.values()]:
            ray.kill(handle)
