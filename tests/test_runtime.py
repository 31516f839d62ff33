"""The Ray runtime on a real local Ray cluster (one per test session): workflows run end to end through the
planner actor and one worker actor per GPU with the SimEngine; a worker killed mid-shard loses no output."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from faults import kill_a_busy_worker

from fate_ray.explain import read_decisions
from fate_ray.runtime.driver import RunConfig, read_requests, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILE = ROOT / "workflows" / "clusters" / "mixed-h100-l4.yaml"
_suffix = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    return load_cluster(CLUSTER_FILE)


@pytest.fixture
def ray_cluster(ray_client):
    return ray_client


@pytest.fixture
def actors(ray_cluster, cluster, request):
    cfg = ServiceConfig(policy="fate", time_scale=0.01, fail_stages=frozenset(getattr(request, "param", ())))
    planner, workers = start_actors(cluster, cfg, name_suffix=f"-t{next(_suffix)}")
    yield cfg, planner, workers
    for handle in [planner, *workers.values()]:
        ray.kill(handle)


def examples(cluster, names):
    return [load_workflow(ROOT / "workflows" / f"{n}.yaml", cluster)[1] for n in names]


def outputs_by_request(out_dir: Path, workflow_id: str) -> dict:
    rows = [json.loads(line) for line in (out_dir / f"{workflow_id}.jsonl").read_text().splitlines()]
    seen: dict = {}
    for row in rows:
        key = (row["stage"], row["request"])
        assert key not in seen, f"{workflow_id}: {key} recorded twice"
        seen[key] = row
    return seen


def test_examples_run_to_completion_with_every_output_once(cluster, actors, tmp_path):
    cfg, planner, _ = actors
    wfs = examples(cluster, ["rag_rerank", "mapreduce_summary", "self_consistency"])
    summary = run_workflows(wfs, RunConfig(out_dir=tmp_path), planner)
    assert summary["failed"] == []
    assert (tmp_path / "gantt.png").stat().st_size > 10_000
    for wf in wfs:
        got = outputs_by_request(tmp_path, wf.workflow_id)
        expected = {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
        assert set(got) == expected
        assert all(row["output"] and row["output_tokens"] > 0 for row in got.values())
        # Children start after their parents end (wall clock on the workers).
        end = {}
        for (sid, _), row in got.items():
            end[sid] = max(end.get(sid, 0.0), row["end_s"])
        for (sid, _), row in got.items():
            for parent in wf.stages[sid].parents:
                assert row["start_s"] >= end[parent] - 0.05, (sid, parent)


def test_two_submissions_of_one_workflow_share_the_cluster(cluster, actors, tmp_path):
    cfg, planner, _ = actors
    wfs = examples(cluster, ["multiturn_chain", "multiturn_chain"])
    summary = run_workflows(wfs, RunConfig(out_dir=tmp_path), planner)
    assert summary["failed"] == []
    assert {p["name"] for p in summary["workflows"]} == {"multiturn-chain", "multiturn-chain-2"}


def test_a_workflow_submitted_while_another_runs_shares_the_planner(cluster, actors):
    _, planner, _ = actors
    first = ray.get(planner.submit.remote(examples(cluster, ["mapreduce_summary"])))
    deadline = time.monotonic() + 60
    while not any(p["running_shards"] for p in ray.get(planner.progress.remote())):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = ray.get(planner.submit.remote(examples(cluster, ["router_specialists"])))
    status = ray.get(planner.wait.remote(first + second, 120))
    assert [status[w]["state"] for w in first + second] == ["done", "done"]


def test_a_worker_killed_mid_shard_loses_no_output(cluster, actors, tmp_path):
    cfg, planner, workers = actors
    wfs = examples(cluster, ["mapreduce_summary"])
    ids = ray.get(planner.submit.remote(wfs))
    kill_a_busy_worker(planner, workers, timeout_s=60)  # the device running the map stage's first shard
    status = ray.get(planner.wait.remote(ids, 120))
    assert status[ids[0]]["state"] == "done", status
    from fate_ray.runtime.driver import write_results

    write_results(planner, {w: w for w in ids}, list(status.values()), tmp_path)
    got = outputs_by_request(tmp_path, ids[0])
    wf = wfs[0]
    assert set(got) == {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
    stats = ray.get(planner.stats.remote())
    assert stats["retries"] >= 1


@pytest.mark.parametrize("actors", [("title",)], indirect=True)
def test_a_stage_that_always_fails_fails_its_workflow_and_the_others_finish(cluster, actors, tmp_path):
    cfg, planner, _ = actors
    # multiturn_chain has a `title` stage; the injected fault makes every attempt of it fail.
    wfs = examples(cluster, ["multiturn_chain", "rag_rerank"])
    summary = run_workflows(wfs, RunConfig(out_dir=tmp_path), planner)
    by_id = {p["name"]: p for p in summary["workflows"]}
    assert by_id["multiturn-chain"]["state"] == "failed"
    assert "stage 'title' failed after 3 attempt(s)" in by_id["multiturn-chain"]["error"]
    assert "injected failure" in by_id["multiturn-chain"]["error"]
    assert by_id["rag-rerank"]["state"] == "done"
    assert summary["failed"] == [by_id["multiturn-chain"]["workflow"]]


def test_the_runtime_makes_the_simulators_assignments(ray_cluster, cluster, tmp_path):
    """Same policy, same workload, deterministic durations: the Ray runtime with SimEngine places every stage on
    the device the simulator does, in the same order. The workload is a chain (plus one side stage), so no two
    finishes race in wall time; stages dispatched in one round are compared as a set."""
    from fate_ray.engines.physics import Draws
    from fate_ray.sim.simulator import SimConfig, simulate

    wfs = examples(cluster, ["multiturn_chain"])
    sim_decisions: list[dict] = []
    sim = simulate(cluster, wfs, "fate", SimConfig(seed=0, output_sigma=0.0, load_noise=False), record_trace=True,
                   decisions=sim_decisions)
    expected = sorted((r["start_s"], r["stage"], r["device"]) for r in sim.trace_rows())
    cfg = ServiceConfig(policy="fate", time_scale=0.005, draws=Draws(0, 0.0, False))
    planner, workers = start_actors(cluster, cfg, name_suffix=f"-t{next(_suffix)}")
    try:
        summary = run_workflows(wfs, RunConfig(out_dir=tmp_path, explain=True), planner)
        assert summary["failed"] == []
        # `fate-ray run --explain`: the same decisions as the simulator's, each with FATE's candidate terms.
        ray_decisions = read_decisions(tmp_path / "decisions.jsonl")
        assert [(r["stage"], r["chosen"]) for r in ray_decisions] == [(r["stage"], r["chosen"]) for r in sim_decisions]
        assert all(r["candidates"] for r in ray_decisions)
        shards = list({row["shard"]: row for row in read_requests(tmp_path, "multiturn-chain")}.values())
        got = {(s["stage"], s["device"]) for s in shards}
        assert got == {(stage, device) for _, stage, device in expected}
        assert len(shards) == len(expected)
        by_dispatch = [s["stage"] for s in sorted(shards, key=lambda s: s["dispatched_s"])]
        chain = [stage for stage in by_dispatch if stage.startswith("turn")]
        assert chain == [stage for _, stage, _ in expected if stage.startswith("turn")]
    finally:
        for handle in [planner, *workers.values()]:
            ray.kill(handle)


def test_bad_input_fails_with_the_validation_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - id: a\n    model: llama3.1-8b\n    after: [b]\n"
                   "    prompt: {template: hi}\n    max_tokens: 8\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fate_ray.cli", "run", str(bad)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"error: {bad}:5: stage 'a' depends on unknown stage 'b'" in proc.stderr
