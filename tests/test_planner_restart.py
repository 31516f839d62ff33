"""A planner killed mid-run on a real Ray head comes back from its journal (Ray restarts it; it replays): the
driver rides out the restart, every workflow completes, and every request's output is recorded exactly once."""

from __future__ import annotations

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
