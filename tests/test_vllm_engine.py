"""Real inference: vLLM engines on CPU (tiny models built locally) in the worker actors of a real local Ray cluster.

One set of actors serves the module (each engine takes ~20-30 s to start on two cores); the test that kills a
worker runs last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from faults import kill_a_busy_worker

from fate_ray.engines.tiny_models import build_all
from fate_ray.engines.tokens import TokenCounter
from fate_ray.runtime.driver import RunConfig, run_workflows, write_results
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow
from fate_ray.state import blocks_through

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_cluster():
    build_all()
    return load_cluster(ROOT / "workflows" / "clusters" / "local-cpu.yaml")


@pytest.fixture(scope="module")
def connected(ray_head):
    if not ray.is_initialized():
        ray.init(address=ray_head.gcs_address, log_to_driver=False)
    return ray_head


@pytest.fixture(scope="module")
def vllm_actors(connected, cpu_cluster):
    cfg = ServiceConfig(policy="fate", engine="vllm")
    planner, workers = start_actors(cpu_cluster, cfg, name_suffix="-vllm")
    yield planner, workers
    for worker in workers.values():
        try:
            ray.get(worker.shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 -- killed by a test
            pass
    for handle in [planner, *workers.values()]:
        ray.kill(handle)


def support_answers(cluster, workflow_id: str = "support-answers"):
    wf = load_workflow(ROOT / "workflows" / "support_answers.yaml", cluster, TokenCounter(cluster))[1]
    return wf.with_arrival(workflow_id, 0.0)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_two_model_workflow_runs_on_real_engines_and_its_prefix_hits_are_the_predicted_ones(
        cpu_cluster, vllm_actors, tmp_path):
    planner, workers = vllm_actors
    wf = support_answers(cpu_cluster)
    summary = run_workflows([wf], RunConfig(out_dir=tmp_path, timeout_s=600), planner)
    assert summary["failed"] == []
    got = rows(tmp_path / "support-answers.jsonl")
    keys = [(r["stage"], r["request"]) for r in got]
    assert sorted(keys) == sorted((sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests))
    assert {r["model"] for r in got} == {"qwen2.5-1.5b", "llama3.1-8b"}
    assert all(r["output"] and r["output_tokens"] > 0 for r in got)
    # The engine's prompt sizes are the planner's (the same tokenizer counted them), and so are its block edges:
    # the cached tokens the planner predicted are vLLM's within one block, request by request.
    block = cpu_cluster.block_tokens
    for r in got:
        assert abs(r["predicted_cached_tokens"] - r["cached_tokens"]) <= block, r
    # A follow-up placed where its answer ran continues that conversation from the prefix cache.
    answers = {r["request"]: r for r in got if r["stage"] == "answer"}
    local = [r for r in got if r["stage"] == "follow_up" and r["device"] == answers[r["request"]]["device"]]
    assert local, "no follow-up ran on its answer's device"
    for r in local:  # every full block of the answer's conversation (its prompt, then its reply) was a hit
        answer = answers[r["request"]]
        assert r["cached_tokens"] >= (answer["prompt_tokens"] + answer["output_tokens"]) // block * block > 0, r
    # The engines loaded and unloaded exactly what the planner commanded.
    stats = ray.get(planner.stats.remote())
    done = [ray.get(w.engine_events.remote()) for w in workers.values()]
    assert sum(e["load"] for e in done) == stats["model_events"]["load"] >= 2
    assert sum(e["unload"] + e["sleep"] for e in done) == stats["model_events"]["evict"]
    # The workers' state reports reach the Controller: its belief is what they report.
    assert stats["reports"]["adopted"] > 0
    time.sleep(6)  # one report interval, with nothing running
    belief = {d["device"]: sorted(d["resident"]) for d in ray.get(planner.service_status.remote())["devices"]}
    reported = {device: sorted(m for m, r in ray.get(w.report.remote()).residency.items() if r == "ACTIVE")
                for device, w in workers.items()}
    assert belief == reported
    assert summary["prefix"]["hit_rate"] > 0.3


def test_blocks_vllm_evicts_leave_the_reported_cache(cpu_cluster, connected, tmp_path):
    """A KV cache of 40 blocks for the small model: two runs of the workflow need more, so vLLM evicts, says so in
    its KV events, and the workers' reports (hence the planner's belief) drop those blocks."""
    small_kv_gib = 40 * cpu_cluster.block_tokens * 2 / 2**20  # 40 blocks of 2 KiB tokens
    models = dict(cpu_cluster.models)
    models["qwen2.5-1.5b"] = models["qwen2.5-1.5b"].model_copy(update={"kv_reserve_gib": small_kv_gib,
                                                                        "max_model_len": 1200})
    cluster = cpu_cluster.model_copy(update={"models": models})
    planner, workers = start_actors(cluster, ServiceConfig(policy="fate", engine="vllm"), name_suffix="-vllm-kv")
    try:
        twice = [support_answers(cluster, "support-answers-kv"), support_answers(cluster, "support-answers-kv2")]
        summary = run_workflows(twice, RunConfig(out_dir=tmp_path, timeout_s=600), planner)
        assert summary["failed"] == []
        counts = [ray.get(w.engine_events.remote()) for w in workers.values()]
        assert sum(c["kv_blocks_stored"] for c in counts) > 0
        assert sum(c["kv_blocks_removed"] for c in counts) > 0, "vLLM evicted nothing: the cache is not small"
        capacity = cluster.models["qwen2.5-1.5b"].cache_capacity_blocks(cluster.block_tokens)
        assert capacity == 40
        for worker in workers.values():
            held = ray.get(worker.report.remote()).blocks.get("qwen2.5-1.5b", ())
            assert max(map(blocks_through, held), default=0) <= capacity  # no chain longer than the cache
        # The evictions reach the planner: once the workers report, its belief is what they hold.
        time.sleep(6)  # one report interval, with nothing running
        belief = {d["device"]: sorted(d["resident"]) for d in ray.get(planner.service_status.remote())["devices"]}
        reported = {device: sorted(m for m, r in ray.get(w.report.remote()).residency.items() if r == "ACTIVE")
                    for device, w in workers.items()}
        assert belief == reported
    finally:
        for handle in [planner, *workers.values()]:
            ray.kill(handle)


def test_a_worker_killed_mid_shard_on_real_engines_loses_and_duplicates_nothing(cpu_cluster, vllm_actors, tmp_path):
    planner, workers = vllm_actors
    wf = support_answers(cpu_cluster, "support-answers-kill")
    ids = ray.get(planner.submit.remote([wf]))
    victim = kill_a_busy_worker(planner, workers)
    killed_s = time.time()
    status = ray.get(planner.wait.remote(ids, 600))
    assert status[ids[0]]["state"] == "done", status
    write_results(planner, {w: w for w in ids}, list(status.values()), tmp_path)
    got = rows(tmp_path / "support-answers-kill.jsonl")
    keys = [(r["stage"], r["request"]) for r in got]
    assert len(keys) == len(set(keys)), "an output was recorded twice"
    assert set(keys) == {(sid, i) for sid, st in wf.stages.items() for i in range(st.num_requests)}
    # What the victim finished before it died stays recorded; nothing it was running is.
    assert all(r["end_s"] <= killed_s for r in got if r["device"] == victim)
    assert any(r["device"] != victim for r in got)
    assert ray.get(planner.stats.remote())["retries"] >= 1
