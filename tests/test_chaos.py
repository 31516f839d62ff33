"""Chaos on a real Ray head: 32 workflows run while a seeded schedule kills three random GPU workers and, once, the
planner (restarted by Ray from its journal). Every workflow completes and every request's output is recorded exactly
once: the records' (workflow, stage, request) keys are exactly those of a fault-free run, i.e. every request of
every stage."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import ray

from fate_ray.runtime.driver import RunConfig, ask, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
SEED = 7
EXAMPLES = ["rag_rerank", "mapreduce_summary", "self_consistency", "multiturn_chain"]


@pytest.mark.slow
def test_workers_and_the_planner_killed_mid_run_lose_and_duplicate_nothing(ray_client, tmp_path):
    cluster = load_cluster(ROOT / "workflows" / "clusters" / "mixed-h100-l4.yaml")
    wfs = [load_workflow(ROOT / "workflows" / f"{EXAMPLES[i % 4]}.yaml", cluster)[1] for i in range(32)]
    cfg = ServiceConfig(time_scale=0.02, state_dir=str(tmp_path / "state"))
    planner, workers = start_actors(cluster, cfg, name_suffix="-chaos")
    rng = random.Random(SEED)
    total_stages = sum(len(wf.stages) for wf in wfs)
    # (fraction of all stages done, victim): three workers, and the planner once, in a seeded order.
    victims = rng.sample(sorted(workers), 3) + ["planner"]
    rng.shuffle(victims)
    schedule = list(zip(sorted(rng.uniform(0.1, 0.7) for _ in victims), victims))
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_workflows(
        wfs, RunConfig(out_dir=tmp_path / "out", timeout_s=600), planner)))
    killed = []
    try:
        runner.start()
        deadline = time.monotonic() + 600
        while schedule and runner.is_alive() and time.monotonic() < deadline:
            done = sum(p["stages_done"] for p in ask(planner.progress))
            at, victim = schedule[0]
            if done >= at * total_stages:
                schedule.pop(0)
                ray.kill(planner if victim == "planner" else workers[victim], no_restart=victim != "planner")
                killed.append(victim)
            time.sleep(0.1)
        runner.join(600)
        assert not runner.is_alive()
        assert len(killed) == 4, f"the run ended before the schedule did: killed {killed}"
        summary = result["summary"]
        assert summary["failed"] == [], summary["failed"]
        by_name = {w.workflow_id: w for w in wfs}  # the 4 examples; repeats are named `<name>-<k>`
        for p in summary["workflows"]:
            wf = by_name.get(p["name"]) or by_name[p["name"].rsplit("-", 1)[0]]
            rows = [json.loads(line) for line in (tmp_path / "out" / p["file"]).read_text().splitlines()]
            keys = [(r["stage"], r["request"]) for r in rows]
            assert len(keys) == len(set(keys)), f"{p['name']}: a request recorded twice"
            assert set(keys) == {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
        assert len(summary["workflows"]) == 32
    finally:
        for handle in [planner, *workers.values()]:
            ray.kill(handle)
