"""The six baselines on hand-built cluster snapshots of the tiny cluster (conftest).

Devices: G0 = n1/gpu0 and G1 = n1/gpu1 (fast, concurrency 2), S2 = n2/gpu2 and S3 = n2/gpu3 (slow, concurrency 1).
Model c does not fit a slow device. The default request (100-token prompt, 10 output tokens) takes 1.1 s on a fast
device (1.0 s prefill + 10 x 10 ms) and 2.15 s on a slow one (2.0 s + 10 x 15 ms).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.policies import BASELINES, Plan, Policy, PolicyContext, ReadyStage, make_policy
from fate_ray.policies.base import PlanContractError
from fate_ray.state import ClusterSnapshot, DeviceSnapshot, PrefixCache, block_hashes
from fate_ray.workload import Segment

ROOT = Path(__file__).resolve().parents[1]
G0, G1, S2, S3 = "n1/gpu0", "n1/gpu1", "n2/gpu2", "n2/gpu3"


def policy(cluster, name: str, seed: int = 0):
    return make_policy(name, PolicyContext(cluster, CostEstimator(cluster), seed))


def device(cluster, device_id: str, *, free_at_s: float = 0.0, queued: int = 0, alive: bool = True,
           residency: dict | None = None, caches: dict | None = None, concurrency: int | None = None):
    d = next(d for d in cluster.devices if d.device_id == device_id)
    dtype = cluster.device_types[d.type]
    return DeviceSnapshot(
        device=d, memory_gib=dtype.memory_gib, concurrency=concurrency or dtype.concurrency, alive=alive,
        residency=MappingProxyType(residency or {}), caches=MappingProxyType(caches or {}),
        busy_models=frozenset(), free_at_s=free_at_s, running_shards=0, queued_requests=queued,
    )


def snapshot(cluster, now_s: float = 0.0, order=(G0, G1, S2, S3), **per_device) -> ClusterSnapshot:
    """`snapshot(cluster, S3={"alive": False})`; keyword names are G0/G1/S2/S3."""
    names = {G0: "G0", G1: "G1", S2: "S2", S3: "S3"}
    return ClusterSnapshot(now_s, tuple(device(cluster, i, **per_device.get(names[i], {})) for i in order))


def ready(stage_id: str, model: str, n: int = 1, *, indices: tuple[int, ...] | None = None, rank_s: float = 0.0,
          prompt: tuple[Segment, ...] | None = None) -> ReadyStage:
    idx = indices if indices is not None else tuple(range(n))
    tokens, hashes = (sum(s.tokens for s in prompt), block_hashes(prompt, 4)) if prompt else (100, ())
    return ReadyStage(("w", stage_id), model, idx, tuple(RequestShape(tokens, hashes, 10) for _ in idx), True,
                      rank_s, 0.0)


def placed(plan: Plan, stage_id: str) -> list[str]:
    """Devices of one stage's requests, in request-index order."""
    where = {i: a.device_id for a in plan.assignments if a.stage == ("w", stage_id) for i in a.request_indices}
    return [where[i] for i in sorted(where)]


def cache_of(*prompt: Segment) -> PrefixCache:
    cache = PrefixCache(256)
    cache.insert(block_hashes(prompt, 4))
    return cache


# ---------------------------------------------------------------------------------------------------------------
# Registry and the common contract


def test_unknown_policy_names_the_known_ones(tiny_cluster):
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; known: ") as err:
        policy(tiny_cluster, "nope")
    for name in BASELINES:
        assert name in str(err.value)


@pytest.fixture
def contract_breaker():
    """A registered policy that leaves every request unplaced (a bug), removed again after the test."""
    from fate_ray.policies import registry

    class LeavesAllUnplaced(Policy):
        name = "test-leaves-all-unplaced"

        def plan(self, snapshot, frontier):
            return Plan(())

    registry.register(LeavesAllUnplaced)
    yield LeavesAllUnplaced.name
    registry._REGISTRY.pop(LeavesAllUnplaced.name)


def test_a_policy_that_breaks_the_plan_contract_is_a_bug_not_a_user_error(contract_breaker, monkeypatch):
    """`fate-ray simulate` lets the PlanContractError through (traceback, exit 1) instead of printing
    `error: ...` and exiting 2 as for a typo in YAML."""
    from fate_ray.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(PlanContractError, match="left 1 request"):
        main(["simulate", "workflows/multiturn_chain.yaml", "--policy", contract_breaker])


@pytest.mark.parametrize("name", BASELINES)
def test_every_request_goes_to_exactly_one_live_device_that_fits(tiny_cluster, name):
    prompt = (Segment(1, 40),)
    snap = snapshot(
        tiny_cluster, now_s=3.0,
        G0={"free_at_s": 7.0, "queued": 9, "residency": {"a": "ACTIVE"}, "caches": {"a": cache_of(*prompt)}},
        G1={"alive": False, "residency": {"c": "ACTIVE", "b": "ACTIVE"}, "caches": {"c": cache_of(*prompt)}},
        S2={"free_at_s": 1.0, "queued": 2, "residency": {"b": "SLEEPING"}},
    )
    frontier = [ready("x", "a", 5, rank_s=4.0, prompt=prompt), ready("y", "c", indices=(1, 4, 6), rank_s=9.0),
                ready("z", "b", 1, rank_s=1.0, prompt=prompt)]
    pol = policy(tiny_cluster, name)
    for _ in range(2):  # a second round too: some policies keep state between rounds
        plan = pol.plan(snap, frontier)
        seen = [(a.stage, i, a.device_id) for a in plan.assignments for i in a.request_indices]
        assert sorted((s, i) for s, i, _ in seen) == sorted((r.key, i) for r in frontier for i in r.request_indices)
        models = {r.key: r.model for r in frontier}
        for stage, _, device_id in seen:
            assert device_id != G1, "placed on a dead device"
            assert tiny_cluster.fits(models[stage], snap.device(device_id).device.type)
        assert all(a.request_indices for a in plan.assignments)


# ---------------------------------------------------------------------------------------------------------------
# RoundRobin and Random


def test_round_robin_cycles_over_the_live_devices_that_fit(tiny_cluster):
    rr = policy(tiny_cluster, "round_robin")
    snap = snapshot(tiny_cluster, S3={"alive": False})
    plan = rr.plan(snap, [ready("big", "c", 5), ready("small", "a", 4)])
    assert placed(plan, "big") == [G0, G1, G0, G1, G0]  # c does not fit a slow device
    assert placed(plan, "small") == [G0, G1, S2, G0]
    # The cycle goes on from where it stopped in the next round.
    assert placed(rr.plan(snap, [ready("next", "a", 2)]), "next") == [G1, S2]


def test_random_is_seeded_and_uses_only_live_devices_that_fit(tiny_cluster):
    snap = snapshot(tiny_cluster, S3={"alive": False})
    frontier = [ready("small", "a", 200), ready("big", "c", 100)]
    plan = policy(tiny_cluster, "random", seed=7).plan(snap, frontier)
    assert policy(tiny_cluster, "random", seed=7).plan(snap, frontier) == plan
    assert policy(tiny_cluster, "random", seed=8).plan(snap, frontier) != plan
    assert set(placed(plan, "small")) == {G0, G1, S2}
    assert set(placed(plan, "big")) == {G0, G1}


# ---------------------------------------------------------------------------------------------------------------
# LeastLoaded and HEFT


def test_least_loaded_picks_the_earliest_free_device_counting_this_rounds_work(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"free_at_s": 5.0}, G1={"free_at_s": 3.0}, S2={"free_at_s": 1.0},
                    S3={"free_at_s": 2.0})
    # S2 then frees at 1 + 2.15; S3 at 2 + 2.15; G1 at 3 + 1.1 / 2 (two slots) = 3.55; then S2 (3.15) again.
    assert placed(policy(tiny_cluster, "least_loaded").plan(snap, [ready("s", "a", 4)]), "s") == [S2, S3, G1, S2]


def test_least_loaded_counts_a_backlog_from_now_not_from_the_past(tiny_cluster):
    snap = snapshot(tiny_cluster, now_s=10.0, G0={"free_at_s": 11.0}, G1={"free_at_s": 2.0},
                    S2={"free_at_s": 10.5}, S3={"alive": False})
    # G1 is idle since t=2, so after one request it is busy until 10 + 0.55, later than S2.
    assert placed(policy(tiny_cluster, "least_loaded").plan(snap, [ready("s", "a", 2)]), "s") == [G1, S2]


def test_heft_picks_the_faster_device_type_when_queues_are_equal(tiny_cluster):
    snap = snapshot(tiny_cluster, order=(S2, S3, G0, G1))  # slow devices listed first
    assert placed(policy(tiny_cluster, "heft").plan(snap, [ready("s", "a")]), "s") == [G0]


def test_heft_picks_the_earliest_finish_not_the_fastest_device(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"free_at_s": 3.0}, G1={"alive": False}, S3={"alive": False})
    assert placed(policy(tiny_cluster, "heft").plan(snap, [ready("s", "a")]), "s") == [S2]  # 2.15 < 3 + 1.1


def test_heft_places_stages_in_decreasing_rank(tiny_cluster):
    heft = policy(tiny_cluster, "heft")
    assert heft.queue_order == "rank"
    snap = snapshot(tiny_cluster, G0={"concurrency": 1}, G1={"alive": False}, S3={"alive": False})
    plan = heft.plan(snap, [ready("low", "a", rank_s=1.0), ready("high", "a", rank_s=5.0)])
    # The high-rank stage takes the fast device; the low-rank one would finish there at 2.2 s, on S2 at 2.15 s.
    assert placed(plan, "high") == [G0] and placed(plan, "low") == [S2]
    assert [a.stage for a in plan.assignments] == [("w", "high"), ("w", "low")]


# ---------------------------------------------------------------------------------------------------------------
# ModelAffinity


def test_model_affinity_prefers_a_device_where_the_model_is_active_even_if_busier(tiny_cluster):
    snap = snapshot(tiny_cluster, S2={"free_at_s": 4.0, "residency": {"a": "ACTIVE"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [S2]


def test_model_affinity_takes_the_least_loaded_warm_device_and_ignores_sleeping_models(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"free_at_s": 1.0, "residency": {"a": "SLEEPING"}},
                    G1={"free_at_s": 3.0, "residency": {"a": "ACTIVE"}},
                    S2={"free_at_s": 4.0, "residency": {"a": "ACTIVE"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [G1]


def test_model_affinity_falls_back_to_the_least_loaded_device_and_then_keeps_the_model_there(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"free_at_s": 2.0}, G1={"free_at_s": 1.0}, S2={"free_at_s": 0.5},
                    S3={"free_at_s": 3.0})
    # b is nowhere: S2 is the least loaded; the second request follows it there (b will be loaded by then), although
    # S2 is then busy until 2.65 and G1 frees at 1.
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "b", 2)]), "s") == [S2, S2]


# ---------------------------------------------------------------------------------------------------------------
# PrefixAffinity (SGLang cache-aware rules: match ratio >= 0.3 unless imbalanced: > 64 requests apart and > 1.5x)

PROMPT = (Segment(1, 40),)  # 10 blocks of 4 tokens


def route(cluster, **per_device) -> str:
    snap = snapshot(cluster, **per_device)
    return placed(policy(cluster, "prefix_affinity").plan(snap, [ready("s", "a", prompt=PROMPT)]), "s")[0]


def test_prefix_affinity_follows_the_cache_over_the_queue(tiny_cluster):
    # G1 holds 16 of 40 prompt tokens (ratio 0.4) and has 10 more requests queued than the others.
    assert route(tiny_cluster, G1={"queued": 10, "caches": {"a": cache_of(Segment(1, 16))}}) == G1


def test_prefix_affinity_picks_the_longest_cached_prefix(tiny_cluster):
    assert route(tiny_cluster, G0={"caches": {"a": cache_of(Segment(1, 16))}},
                 S3={"caches": {"a": cache_of(Segment(1, 24))}}) == S3


def test_prefix_affinity_uses_the_least_loaded_device_below_the_match_threshold(tiny_cluster):
    loads = {"G0": {"queued": 5}, "S2": {"queued": 1}, "S3": {"queued": 2}}
    exactly_at = {**loads, "G1": {"queued": 3, "caches": {"a": cache_of(Segment(1, 12))}}}  # 12 / 40 = 0.3
    below = {**loads, "G1": {"queued": 3, "caches": {"a": cache_of(Segment(1, 8))}}}  # 8 / 40 = 0.2
    assert route(tiny_cluster, **exactly_at) == G1
    assert route(tiny_cluster, **below) == S2


def test_prefix_affinity_ignores_other_models_caches(tiny_cluster):
    assert route(tiny_cluster, G1={"queued": 3, "caches": {"b": cache_of(*PROMPT)}}, G0={"queued": 1},
                 S2={"queued": 1}, S3={"queued": 1}) == G0


@pytest.mark.parametrize("cached_load, other_loads, expected", [
    (200, (140, 150, 160), G1),   # 60 apart: balanced, the cache wins
    (300, (210, 250, 260), G1),   # 90 apart but only 1.43x: balanced
    (200, (100, 150, 120), G0),   # 100 apart and 2x: imbalanced, the least loaded wins
])
def test_prefix_affinity_switches_to_the_least_loaded_device_when_load_is_imbalanced(tiny_cluster, cached_load,
                                                                                     other_loads, expected):
    g0, s2, s3 = other_loads
    assert route(tiny_cluster, G1={"queued": cached_load, "caches": {"a": cache_of(*PROMPT)}}, G0={"queued": g0},
                 S2={"queued": s2}, S3={"queued": s3}) == expected


def test_prefix_affinity_remembers_where_this_round_sent_a_prefix(tiny_cluster):
    snap = snapshot(tiny_cluster)
    plan = policy(tiny_cluster, "prefix_affinity").plan(snap, [ready("s", "a", 3, prompt=PROMPT)])
    assert placed(plan, "s") == [G0, G0, G0]  # no cache anywhere: the first goes to G0, the rest follow it
