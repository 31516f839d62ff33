"""The engine model (the simulator's truth) on the tiny cluster, where the physics differs from the planner's
closed-form estimate: batching, long contexts, KV memory, prefix survival, drawn output lengths and loads.

Model a on a `fast` device (conftest): 2 GiB of weights, a 1 GiB KV pool at 1 MiB per token = 1024 tokens = 256
blocks of 4 tokens; prefill 100 tokens/s; a decode step of 10 ms at batch 1 and context 1024.
"""

from __future__ import annotations

import math

import pytest

from fate_ray.engines.engine_model import ModelledEngine
from fate_ray.engines.physics import Draws, derive_physics
from fate_ray.events import Dispatch, LoadModel, Shard
from fate_ray.state import block_hashes
from fate_ray.workload import Segment

EXACT = Draws(seed=0, output_sigma=0.0, load_noise=False)


def shard(shard_id: str, prompts: list[list[Segment]], output_tokens: int, model: str = "a",
          block_tokens: int = 4) -> Shard:
    return Shard(shard_id=shard_id, workflow_id="w", stage_id=shard_id, model=model,
                 request_indices=tuple(range(len(prompts))), prompts=tuple(tuple(p) for p in prompts),
                 block_hashes=tuple(block_hashes(p, block_tokens) for p in prompts),
                 expected_output_tokens=output_tokens, max_tokens=10 * output_tokens, rank_s=0.0, arrival_s=0.0)


def engine(tiny_cluster, draws: Draws = EXACT, device: int = 0, page_cache: set | None = None) -> ModelledEngine:
    eng = ModelledEngine(tiny_cluster, tiny_cluster.devices[device], draws, page_cache=page_cache)
    eng.preload("a")
    return eng


def run(eng: ModelledEngine, *submissions: tuple[float, Shard]) -> dict:
    """Submit shards at their times and run the model until every one finished: shard id -> outcome."""
    pending = sorted(submissions, key=lambda s: s[0])
    done: dict = {}
    now = 0.0
    while pending or eng.next_event_s() < math.inf:
        next_event = eng.next_event_s()
        if pending and pending[0][0] <= next_event:
            now, sh = pending.pop(0)
            for s, outcome in eng.submit(Dispatch(sh, eng.device_id, (), "resident", 0.0), now):
                done[s.shard_id] = outcome
        else:
            now = next_event
            for s, outcome in eng.advance(now):
                done[s.shard_id] = outcome
    return done


def text(key: int, tokens: int) -> list[Segment]:
    return [Segment(key, tokens)]


def test_a_decode_step_at_batch_32_costs_less_than_32_single_steps_but_more_than_one(tiny_cluster):
    phys = derive_physics(tiny_cluster, "a", "fast")
    one = phys.decode_step_ms(1, 1024)
    assert one == pytest.approx(10.0)
    assert one < phys.decode_step_ms(32, 32 * 1024) < 32 * one
    # Long contexts cost more per step: the KV cache is read every step (the estimator ignores context).
    assert phys.decode_step_ms(1, 4096) > phys.decode_step_ms(1, 1024)


def test_prefill_costs_more_than_linearly_with_context(tiny_cluster):
    phys = derive_physics(tiny_cluster, "a", "fast")
    assert phys.prefill_s(100, 0) == pytest.approx(1.0, rel=0.01)
    assert phys.prefill_s(100, 30_000) > 1.8 * phys.prefill_s(100, 0)


def test_a_batch_of_32_finishes_sooner_than_32_requests_one_after_another(tiny_cluster):
    one = run(engine(tiny_cluster), (0.0, shard("one", [text(1, 8)], 20)))["one"]
    batch = run(engine(tiny_cluster), (0.0, shard("batch", [text(k, 8) for k in range(32)], 20)))["batch"]
    assert one.end_s < batch.end_s < 32 * one.end_s
    assert batch.output_tokens == (20,) * 32


def test_a_device_whose_kv_memory_is_full_queues_the_next_request(tiny_cluster):
    """600-token prompts hold 150 of the pool's 256 blocks: the second waits for the first to finish."""
    first = shard("first", [text(1, 600)], 10)
    second = shard("second", [text(2, 600)], 10)
    alone = run(engine(tiny_cluster), (0.0, second))["second"]
    both = run(engine(tiny_cluster), (0.0, first), (0.0, second))
    assert both["second"].end_s >= both["first"].end_s + 0.9 * (alone.end_s - alone.start_s)


def test_preempted_requests_are_recomputed_and_still_finish(tiny_cluster):
    """Two 100-token prompts that each generate 500 tokens outgrow the 1024-token pool together."""
    done = run(engine(tiny_cluster), (0.0, shard("a", [text(1, 100)], 500)), (0.0, shard("b", [text(2, 100)], 500)))
    assert done["a"].output_tokens == (500,) and done["b"].output_tokens == (500,)
    assert done["b"].end_s > done["a"].end_s


def test_a_prefix_survives_on_an_idle_device_and_is_evicted_under_kv_pressure(tiny_cluster):
    eng = engine(tiny_cluster)
    prompt = text(7, 400)
    run(eng, (0.0, shard("warm", [prompt], 4)))
    again = run(eng, (100.0, shard("again", [prompt], 4)))["again"]
    assert again.cached_tokens == 399  # every block but the last token, which vLLM recomputes
    evicted = run(eng, (200.0, shard("pressure", [text(8, 800)], 4)))
    assert evicted["pressure"].cached_tokens == 0
    after = run(eng, (300.0, shard("after", [prompt], 4)))["after"]
    # The 800-token prompt needed 200 of 256 blocks: eviction took the old prompt's runs (32, 32, 32 and 4
    # blocks) tail first, as vLLM frees a request's blocks in reverse order, so only its head run survives.
    assert after.cached_tokens == 32 * 4
    assert eng.take_evicted()["a"]  # what the worker reports to the planner


def test_output_lengths_are_drawn_not_expected(tiny_cluster):
    draws = Draws(seed=3)
    outs = [draws.output_tokens("w", "s", i, 200, 10_000) for i in range(400)]
    assert len(set(outs)) > 100
    assert 0.8 * 200 < sum(outs) / len(outs) < 1.2 * 200
    assert outs == [Draws(seed=3).output_tokens("w", "s", i, 200, 10_000) for i in range(400)]  # a pure function


def test_a_reload_from_the_nodes_page_cache_is_faster_than_a_cold_load(tiny_cluster):
    page_cache: set[str] = set()
    cold = ModelledEngine(tiny_cluster, tiny_cluster.devices[0], EXACT, page_cache=page_cache)
    warm = ModelledEngine(tiny_cluster, tiny_cluster.devices[1], EXACT, page_cache=page_cache)
    cold.load(LoadModel(cold.device_id, "b", (), "load", 0.0), 0.0)
    warm.load(LoadModel(warm.device_id, "b", (), "load", 0.0), 0.0)
    cold_ready = cold.engines["b"].ready_at_s
    warm_ready = warm.engines["b"].ready_at_s
    assert 0 < warm_ready < cold_ready <= 10.0 + 1e-9


def test_a_shard_waits_for_its_models_load(tiny_cluster):
    eng = ModelledEngine(tiny_cluster, tiny_cluster.devices[0], EXACT)
    sh = shard("s", [text(1, 8)], 4, model="b")
    done = eng.submit(Dispatch(sh, eng.device_id, (), "load", 0.0), 0.0)
    assert not done
    while not done:
        done = eng.advance(eng.next_event_s())
    outcome = done[0][1]
    assert outcome.activation == "load"
    assert outcome.activation_s == pytest.approx(eng.engines["b"].ready_at_s)
    assert outcome.end_s > outcome.activation_s


def test_the_engine_model_never_imports_the_planners_estimator():
    """The truth must not be the estimator: loading the engine model (and the simulator's use of it) leaves
    fate_ray.cost unimported."""
    import subprocess
    import sys

    code = ("import sys; import fate_ray.engines.engine_model, fate_ray.engines.sim_engine; "
            "print('fate_ray.cost' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
