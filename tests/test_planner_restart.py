"""A planner killed mid-run on a real Ray head comes back from its journal (Ray restarts it; it replays): the
driver rides out the restart, every workflow completes, and every request's output is recorded exactly once."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import ray

from fate_ray.runtime.driver import RunConfig, ask, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]


def test_a_killed_planner_restarts_from_its_journal_and_loses_nothing(ray_client, tmp_path):
    cluster = load_cluster(ROOT / "workflows" / "clusters" / "local.yaml")
    names = ["rag_rerank", "mapreduce_summary", "self_consistency", "multiturn_chain"]
    wfs = [load_workflow(ROOT / "workflows" / f"{n}.yaml", cluster)[1] for n in names]
    cfg = ServiceConfig(time_scale=0.03, state_dir=str(tmp_path / "state"))
    planner, workers = start_actors(cluster, cfg, name_suffix="-restart")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_workflows(
        wfs, RunConfig(out_dir=tmp_path / "out", timeout_s=300), planner)))
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while True:  # kill it once some work is done and some is running
            progress = ask(planner.progress)
            if sum(p["stages_done"] for p in progress) >= 2 and any(p["running_shards"] for p in progress):
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.1)
        ray.kill(planner, no_restart=False)
        runner.join(300)
        assert not runner.is_alive()
        summary = result["summary"]
        assert summary["failed"] == []
        for wf, p in zip(wfs, sorted(summary["workflows"], key=lambda p: names.index(p["name"].replace("-", "_")))):
            rows = ray_rows(tmp_path / "out" / p["file"])
            keys = [(r["stage"], r["request"]) for r in rows]
            assert len(keys) == len(set(keys)), f"{wf.workflow_id}: a request recorded twice"
            assert set(keys) == {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
        assert (tmp_path / "state" / "journal.bin").stat().st_size > 0
    finally:
        for handle in [planner, *workers.values()]:
            ray.kill(handle)


def ray_rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_service_that_went_down_is_finished_by_run_resume(ray_client, tmp_path):
    """The whole service goes (`fate-ray down`) while a job's workflow runs; `fate-ray run --resume DIR` rebuilds the
    planner from its journal on fresh workers, takes the workflow over and writes every output once."""
    import json
    import subprocess

    from fate_ray.runtime.job import fate_ray
    from fate_ray.runtime.service import find_planner

    ray_head = ray_client
    state, cluster_file = tmp_path / "state", str(ROOT / "workflows" / "clusters" / "local.yaml")
    up = fate_ray(ray_head, "up", "--cluster", cluster_file, "--time-scale", "1", "--state-dir", str(state))
    assert up.returncode == 0, up.stderr
    job = subprocess.Popen([str(Path(sys.executable).with_name("fate-ray")), "run",
                            str(ROOT / "workflows" / "mapreduce_summary.yaml"), "--out", str(tmp_path / "first")],
                           env=ray_head.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # midway: a stage done, and shards running
            planner = find_planner()
            progress = ray.get(planner.progress.remote()) if planner is not None else []
            if any(p["stages_done"] >= 1 and p["running_shards"] for p in progress):
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.2)
        down = fate_ray(ray_head, "down")
        assert down.returncode == 0, down.stderr
        _, err = job.communicate(timeout=120)
        assert job.returncode != 0 and "Traceback" not in err, err  # its service went away under it
        resumed = fate_ray(ray_head, "run", "--resume", str(state), "--cluster", cluster_file,
                           "--out", str(tmp_path / "resumed"))
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resumed 1 workflow(s) from {state}" in resumed.stdout
        summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
        assert summary["failed"] == []
        wf = load_workflow(ROOT / "workflows" / "mapreduce_summary.yaml", load_cluster(cluster_file))[1]
        keys = [(r["stage"], r["request"]) for r in ray_rows(tmp_path / "resumed" / summary["workflows"][0]["file"])]
        assert len(keys) == len(set(keys)), "a request recorded twice"
        assert set(keys) == {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
    finally:
        job.kill()
        fate_ray(ray_head, "down")
