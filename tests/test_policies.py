"""The baselines on hand-built cluster snapshots of the tiny cluster (conftest).

Devices: G0 = n1/gpu0 and G1 = n1/gpu1 (fast, concurrency 2), S2 = n2/gpu2 and S3 = n2/gpu3 (slow, concurrency 1).
Model c does not fit a slow device. The default request (100-token prompt, 10 output tokens) takes 1.1 s on a fast
device (1.0 s prefill + 10 x 10 ms) and 2.15 s on a slow one (2.0 s + 10 x 15 ms). Loading a model takes 10 s on a
fast device and 20 s on a slow one; waking it from sleep 1 s and 2 s.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.policies import BASELINES, Plan, Policy, PolicyContext, ReadyStage, make_policy
from fate_ray.policies.base import PlanContractError
from fate_ray.progress import DagInfo
from fate_ray.state import ClusterSnapshot, DeviceSnapshot, PrefixCache, block_hashes
from fate_ray.workload import Segment, Stage, TextPart

ROOT = Path(__file__).resolve().parents[1]
G0, G1, S2, S3 = "n1/gpu0", "n1/gpu1", "n2/gpu2", "n2/gpu3"


def policy(cluster, name: str, seed: int = 0):
    return make_policy(name, PolicyContext(cluster, CostEstimator(cluster), seed))


def device(cluster, device_id: str, *, free_at_s: float = 0.0, queued: int = 0, alive: bool = True,
           residency: dict | None = None, caches: dict | None = None, concurrency: int | None = None,
           running_tokens: dict | None = None):
    """A device snapshot. A model with a cache is ACTIVE unless `residency` says otherwise (a real snapshot only
    has caches of ACTIVE models)."""
    d = next(d for d in cluster.devices if d.device_id == device_id)
    dtype = cluster.device_types[d.type]
    residency = {**{m: "ACTIVE" for m in caches or {}}, **(residency or {})}
    return DeviceSnapshot(
        device=d, memory_gib=dtype.memory_gib, concurrency=concurrency or dtype.concurrency, alive=alive,
        residency=MappingProxyType(residency), caches=MappingProxyType(caches or {}),
        busy_models=frozenset(), free_at_s=free_at_s, running_shards=0, queued_requests=queued,
        running_tokens=MappingProxyType(running_tokens or {}),
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


def test_fate_takes_its_settings_in_its_name(tiny_cluster):
    ctx = PolicyContext(tiny_cluster, CostEstimator(tiny_cluster))
    swept = make_policy("fate:lam=0.5,horizon_hops=1", ctx)
    assert (swept.cfg.lam, swept.cfg.horizon_hops, swept.cfg.solver) == (0.5, 1, "cpsat")
    ablation = make_policy("fate-greedy:lam=2", ctx)  # a variant's own setting stays
    assert (ablation.cfg.lam, ablation.cfg.solver) == (2.0, "greedy")


@pytest.mark.parametrize("name, message", [
    ("fate:lamb=1", "policy 'fate:lamb=1': lamb: Extra inputs are not permitted"),
    ("fate:lam=-1", "policy 'fate:lam=-1': lam: Input should be greater than or equal to 0"),
    ("fate:lam", "policy 'fate:lam': settings are key=value pairs separated by commas, e.g. fate:lam=0.5"),
    ("heft:lam=1", "policy 'heft' takes no settings (in 'heft:lam=1'); FATE and its variants do"),
])
def test_bad_policy_settings_are_refused_in_one_sentence(tiny_cluster, name, message):
    with pytest.raises(ValueError) as err:
        make_policy(name, PolicyContext(tiny_cluster, CostEstimator(tiny_cluster)))
    assert str(err.value) == message


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


def test_least_loaded_picks_the_earliest_finish_counting_this_rounds_work(tiny_cluster):
    """Issue 8 changed the rule from the earliest *free* device (which ignored device speed: it gave
    [S2, S3, G1, S2] here) to the earliest estimated *finish*: backlog + this request's service on that type."""
    snap = snapshot(tiny_cluster, G0={"free_at_s": 5.0}, G1={"free_at_s": 3.0}, S2={"free_at_s": 1.0},
                    S3={"free_at_s": 2.0})
    # Finishes: G0 6.1, G1 4.1, S2 3.15, S3 4.15 -> S2 (now free at 3.15). Then G1 4.1 (free at 3 + 1.1 / 2 slots
    # = 3.55). Then S3 4.15 beats G1 4.65 and S2 5.3. Then G1 4.65 beats G0 6.1, S2 5.3 and S3 6.3.
    assert placed(policy(tiny_cluster, "least_loaded").plan(snap, [ready("s", "a", 4)]), "s") == [S2, G1, S3, G1]


def test_least_loaded_counts_a_backlog_from_now_not_from_the_past(tiny_cluster):
    snap = snapshot(tiny_cluster, now_s=10.0, G0={"free_at_s": 10.2}, G1={"free_at_s": 2.0},
                    S2={"free_at_s": 10.5}, S3={"alive": False})
    # G1 has been idle since t=2: its first request finishes at 10 + 1.1 (before G0's 11.3 and S2's 12.65) and
    # keeps one slot until then, so the second would finish there at 10.55 + 1.1 = 11.65 (not at 2.55 + 1.1): G0.
    assert placed(policy(tiny_cluster, "least_loaded").plan(snap, [ready("s", "a", 2)]), "s") == [G1, G0]


def test_heft_picks_the_faster_device_type_when_queues_are_equal(tiny_cluster):
    snap = snapshot(tiny_cluster, order=(S2, S3, G0, G1))  # slow devices listed first
    assert placed(policy(tiny_cluster, "heft").plan(snap, [ready("s", "a")]), "s") == [G0]


def test_heft_picks_the_earliest_finish_not_the_fastest_device(tiny_cluster):
    # Model a resident on both (issue 8 added the load time to the finish time: with a absent everywhere, G0's
    # 3 + 10 + 1.1 would beat S2's 20 + 2.15).
    warm = {"residency": {"a": "ACTIVE"}}
    snap = snapshot(tiny_cluster, G0={"free_at_s": 3.0, **warm}, G1={"alive": False}, S2=warm, S3={"alive": False})
    assert placed(policy(tiny_cluster, "heft").plan(snap, [ready("s", "a")]), "s") == [S2]  # 2.15 < 3 + 1.1


def test_heft_places_stages_in_decreasing_rank(tiny_cluster):
    # The queue order is no longer HEFT's (it was "rank"): it is a Controller setting shared by every policy.
    # Model a is resident on both devices, so the finish times are the original comparison (issue 8 added loads).
    heft = policy(tiny_cluster, "heft")
    warm = {"residency": {"a": "ACTIVE"}}
    snap = snapshot(tiny_cluster, G0={"concurrency": 1, **warm}, G1={"alive": False}, S2=warm, S3={"alive": False})
    plan = heft.plan(snap, [ready("low", "a", rank_s=1.0), ready("high", "a", rank_s=5.0)])
    # The high-rank stage takes the fast device; the low-rank one would finish there at 2.2 s, on S2 at 2.15 s.
    assert placed(plan, "high") == [G0] and placed(plan, "low") == [S2]
    assert [a.stage for a in plan.assignments] == [("w", "high"), ("w", "low")]


# ---------------------------------------------------------------------------------------------------------------
# ModelAffinity


def test_model_affinity_prefers_a_device_where_the_model_is_active_even_if_busier(tiny_cluster):
    snap = snapshot(tiny_cluster, S2={"free_at_s": 4.0, "residency": {"a": "ACTIVE"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [S2]


def test_model_affinity_takes_the_least_loaded_warm_device_and_ranks_sleeping_models_below_active_ones(tiny_cluster):
    # (Before issue 8 a sleeping model counted as absent; now it is the second tier, below ACTIVE: same choice here.)
    snap = snapshot(tiny_cluster, G0={"free_at_s": 1.0, "residency": {"a": "SLEEPING"}},
                    G1={"free_at_s": 3.0, "residency": {"a": "ACTIVE"}},
                    S2={"free_at_s": 4.0, "residency": {"a": "ACTIVE"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [G1]


def test_model_affinity_falls_back_to_the_earliest_finish_and_then_keeps_the_model_there(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"free_at_s": 2.0}, G1={"free_at_s": 1.0}, S2={"free_at_s": 0.5},
                    S3={"free_at_s": 3.0})
    # b is nowhere: the earliest finish including the load is G1 (1 + 10 + 1.1 = 12.1; S2, the earliest free and
    # the old rule's pick: 0.5 + 20 + 2.15). The second request follows it: b counts as ACTIVE on G1 now (its load
    # will have happened), the first tier, where it finishes at 1 + 11.1 / 2 slots + 1.1 = 7.65.
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "b", 2)]), "s") == [G1, G1]


# ---------------------------------------------------------------------------------------------------------------
# PrefixAffinity (SGLang cache-aware rules: match ratio > 0.3 unless imbalanced: > 64 requests apart and > 1.5x;
# below the threshold, the smallest tree)

PROMPT = tuple(Segment(k, 4) for k in range(1, 11))  # 10 blocks of 4 tokens, one segment (one run) each


def route(cluster, **per_device) -> str:
    snap = snapshot(cluster, **per_device)
    return placed(policy(cluster, "prefix_affinity").plan(snap, [ready("s", "a", prompt=PROMPT)]), "s")[0]


def test_prefix_affinity_follows_the_cache_over_the_queue(tiny_cluster):
    # G1 holds 16 of 40 prompt tokens (ratio 0.4) and has 10 more requests queued than the others.
    assert route(tiny_cluster, G1={"queued": 10, "caches": {"a": cache_of(*PROMPT[:4])}}) == G1


def test_prefix_affinity_picks_the_longest_cached_prefix(tiny_cluster):
    assert route(tiny_cluster, G0={"caches": {"a": cache_of(*PROMPT[:4])}},
                 S3={"caches": {"a": cache_of(*PROMPT[:6])}}) == S3


def test_prefix_affinity_uses_the_smallest_tree_at_or_below_the_match_threshold(tiny_cluster):
    """Issue 8: below the threshold the router picks the smallest tree (was: the fewest requests), and the match
    must be strictly above the threshold, as in sgl-router's code (was: at least)."""
    loads = {"G0": {"queued": 5}, "S2": {"queued": 1}, "S3": {"queued": 2}}
    above = {**loads, "G1": {"queued": 3, "caches": {"a": cache_of(*PROMPT[:4])}}}  # 16 / 40 = 0.4
    exactly_at = {**loads, "G1": {"queued": 3, "caches": {"a": cache_of(*PROMPT[:3])}}}  # 12 / 40 = 0.3
    below = {**loads, "G1": {"queued": 3, "caches": {"a": cache_of(*PROMPT[:2])}}}  # 8 / 40 = 0.2
    assert route(tiny_cluster, **above) == G1
    # G0, S2 and S3 have empty trees for a (a is not even loaded there): of those, the fewest requests.
    assert route(tiny_cluster, **exactly_at) == S2
    assert route(tiny_cluster, **below) == S2


def test_prefix_affinity_below_the_threshold_prefers_a_small_tree_to_a_short_queue(tiny_cluster):
    other = cache_of(Segment(9, 80))  # 20 blocks of another prompt
    small = cache_of(Segment(8, 8))  # 2 blocks
    assert route(tiny_cluster, G0={"caches": {"a": other}}, G1={"queued": 4, "caches": {"a": small}},
                 S2={"caches": {"a": other}}, S3={"caches": {"a": other}}) == G1


def test_prefix_affinity_breaks_a_tie_of_empty_trees_by_residency(tiny_cluster):
    """Equal (empty) trees: ACTIVE beats SLEEPING beats absent, then the fewest requests. A device without the model
    ACTIVE has an empty tree, even if another model caches the prompt there."""
    assert route(tiny_cluster, G0={"queued": 1}, G1={"queued": 9, "residency": {"a": "SLEEPING"}},
                 S2={"queued": 5, "caches": {"a": PrefixCache(256), "b": cache_of(*PROMPT)}}) == S2
    assert route(tiny_cluster, G0={"queued": 1}, G1={"queued": 9, "residency": {"a": "SLEEPING"}}) == G1


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


# ---------------------------------------------------------------------------------------------------------------
# HEFT: mean-cost upward rank, load and wake times in the earliest finish (issue 8)

def two_root_dag() -> DagInfo:
    """Two independent stages: x (model a, 100-token prompt) and y (model c, 150 tokens; c fits fast devices only).
    Stateless costs: x 1.1 s fast, 2.15 s slow (mean over the four devices 1.625); y 1.6 s (fast only, mean 1.6).
    The Controller's best-case ranks put y first (1.6 > 1.1); HEFT's mean-cost ranks put x first (1.625 > 1.6)."""
    x = Stage("x", "a", (), 1, ((TextPart(1, 100),),), 10, 20)
    y = Stage("y", "c", (), 1, ((TextPart(2, 150),),), 10, 20)
    return DagInfo({"x": x, "y": y}, {"x": (), "y": ()}, {"x": [100], "y": [150]}, {"x": 1.1, "y": 1.6})


def test_heft_ranks_with_the_mean_cost_over_the_devices_that_fit(tiny_cluster):
    dag = two_root_dag()
    heft = policy(tiny_cluster, "heft")
    assert heft.mean_ranks(dag) == pytest.approx({"x": 1.625, "y": 1.6})
    x = ReadyStage(("w", "x"), "a", (0,), (RequestShape(100, (), 10),), True, 1.1, 0.0, {}, dag)
    y = ReadyStage(("w", "y"), "c", (0,), (RequestShape(150, (), 10),), True, 1.6, 0.0, {}, dag)
    warm = {"a": "ACTIVE", "c": "ACTIVE"}
    snap = snapshot(tiny_cluster, G0={"concurrency": 1, "residency": warm}, G1={"alive": False},
                    S2={"residency": {"a": "ACTIVE"}}, S3={"alive": False})
    plan = heft.plan(snap, [y, x])
    # x first takes G0 (1.1 < 2.15), then y (c fits G0 only) queues behind it. By the best-case ranks y would have
    # gone first and x to S2 (G0 busy until 1.6: 2.7 > 2.15).
    assert [a.stage for a in plan.assignments] == [("w", "x"), ("w", "y")]
    assert placed(plan, "x") == [G0] and placed(plan, "y") == [G0]


def test_heft_counts_a_load_or_a_wake_in_the_earliest_finish(tiny_cluster):
    only = {"G1": {"alive": False}, "S3": {"alive": False}, "S2": {"residency": {"a": "ACTIVE"}}}
    # a asleep on G0: 1 (wake) + 1.1 = 2.1 beats S2's 2.15; absent from G0: 10 + 1.1 loses to it.
    asleep = snapshot(tiny_cluster, G0={"residency": {"a": "SLEEPING"}}, **only)
    absent = snapshot(tiny_cluster, **only)
    assert placed(policy(tiny_cluster, "heft").plan(asleep, [ready("s", "a")]), "s") == [G0]
    assert placed(policy(tiny_cluster, "heft").plan(absent, [ready("s", "a")]), "s") == [S2]


def test_heft_pays_a_load_once_per_device_and_round(tiny_cluster):
    """b is nowhere. The first request loads it on G0 (finish 10 + 1.1 = 11.1 s, G0's backlog now 11.1 / 2 slots);
    the next ones find it there (this round's load) and finish at 5.55 + 1.1 = 6.65 and 6.1 + 1.1 = 7.2, before G1,
    which would still need its own load (11.1)."""
    snap = snapshot(tiny_cluster, S2={"alive": False}, S3={"alive": False})
    assert placed(policy(tiny_cluster, "heft").plan(snap, [ready("s", "b", 3)]), "s") == [G0, G0, G0]


# ---------------------------------------------------------------------------------------------------------------
# ModelAffinity: ACTIVE, then SLEEPING (at its wake cost), then the rest (issue 8)


def test_model_affinity_prefers_a_sleeping_model_to_an_absent_one_even_if_it_finishes_later(tiny_cluster):
    # G0: 5 + 1 (wake) + 1.1 = 7.1 beats G1 (idle, a absent: 10 + 1.1); with 15 s of backlog G0 finishes at 17.1,
    # later than G1, and still wins: the tier comes first.
    snap = snapshot(tiny_cluster, G0={"free_at_s": 5.0, "residency": {"a": "SLEEPING"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [G0]
    snap = snapshot(tiny_cluster, G0={"free_at_s": 15.0, "residency": {"a": "SLEEPING"}})
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [G0]  # 17.1 > 11.1


def test_model_affinity_among_sleeping_copies_takes_the_earliest_finish_including_the_wake(tiny_cluster):
    asleep = {"residency": {"a": "SLEEPING"}}
    # G0: 1 + 1.1 = 2.1 < S2: 2 + 2.15; with G0 busy for 3 s more, S2 wins (5.1 > 4.15).
    snap = snapshot(tiny_cluster, G0=asleep, S2=asleep)
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [G0]
    snap = snapshot(tiny_cluster, G0={"free_at_s": 3.0, **asleep}, S2=asleep)
    assert placed(policy(tiny_cluster, "model_affinity").plan(snap, [ready("s", "a")]), "s") == [S2]


# ---------------------------------------------------------------------------------------------------------------
# StateEFT: the whole stage to its earliest finish under the current state (issue 8)

SHORT = (Segment(5, 40),)  # a 40-token prompt: 0.4 s prefill + 0.1 s decode on a fast device, decode only if cached


def test_state_eft_counts_residency_prefix_hits_and_backlog(tiny_cluster):
    hot = {"caches": {"a": cache_of(*SHORT)}}  # a ACTIVE, the whole prompt cached: 0.1 s
    cold = {"residency": {"a": "ACTIVE"}}  # a ACTIVE, nothing cached: 0.5 s
    # S2, S3: a absent (a 20 s load). G0 finishes at 0.3 + 0.1 = 0.4 < G1's 0.5; with 0.5 s of backlog, 0.6 > 0.5.
    for backlog_s, expected in ((0.3, G0), (0.5, G1)):
        snap = snapshot(tiny_cluster, G0={"free_at_s": backlog_s, **hot}, G1=cold)
        plan = policy(tiny_cluster, "state_eft").plan(snap, [ready("s", "a", prompt=SHORT)])
        assert placed(plan, "s") == [expected]


def test_state_eft_counts_this_rounds_earlier_placements(make_cluster):
    """Two stages of b (absent everywhere), the higher-ranked first. It loads b on G0 (10 + 1.1 s). The second then
    finds b there (no second load) behind G0's backlog: 11.1 / 2 slots + 1.1 = 6.65 < G1's 11.1. With one slot per
    fast device the backlog is 11.1 and G1 wins."""
    frontier = [ready("lo", "b", rank_s=1.0), ready("hi", "b", rank_s=2.0)]
    for cluster, expected in ((make_cluster(), G0), (make_cluster(fast={"concurrency": 1}), G1)):
        plan = policy(cluster, "state_eft").plan(snapshot(cluster), frontier)
        assert placed(plan, "hi") == [G0] and placed(plan, "lo") == [expected]


def test_state_eft_splits_a_shardable_stage_by_water_filling_and_keeps_an_unsplittable_one_whole(tiny_cluster):
    warm = {"residency": {"a": "ACTIVE"}}
    snap = snapshot(tiny_cluster, G0=warm, G1=warm, S2={"alive": False}, S3={"alive": False})
    shardable = ready("map", "a", 8)
    whole = ReadyStage(("w", "one"), "a", tuple(range(8)), shardable.requests, False, 0.0, 0.0)
    plan = policy(tiny_cluster, "state_eft").plan(snap, [shardable])
    assert sorted(placed(plan, "map")) == [G0] * 4 + [G1] * 4
    assert placed(policy(tiny_cluster, "state_eft").plan(snap, [whole]), "one") == [G0] * 8


# ---------------------------------------------------------------------------------------------------------------
# LlmdScorer: 3 x prefix + 2 x queue + 2 x KV utilisation, after filtering to devices holding the model (issue 8)


def llmd(cluster, snap, frontier):
    return policy(cluster, "llmd_scorer").plan(snap, frontier)


def test_llmd_scorer_only_considers_devices_that_hold_the_model(tiny_cluster):
    # S2 alone holds a, with a long queue; the idle fast devices would have to load it.
    snap = snapshot(tiny_cluster, S2={"queued": 5, "residency": {"a": "ACTIVE"}})
    assert placed(llmd(tiny_cluster, snap, [ready("s", "a")]), "s") == [S2]


def test_llmd_scorer_falls_back_to_every_fitting_device_and_the_shortest_queue(tiny_cluster):
    snap = snapshot(tiny_cluster, G0={"queued": 2}, G1={"queued": 0}, S2={"queued": 1}, S3={"queued": 4})
    assert placed(llmd(tiny_cluster, snap, [ready("s", "b")]), "s") == [G1]


def test_llmd_scorer_weighs_prefix_queue_and_kv_utilisation(tiny_cluster):
    """G0 caches 5 of the prompt's 10 blocks (prefix 0.5 -> 1.5) but has the longest queue (queue 0); G1 has an empty
    queue (queue 1 -> 2) and no cache. With G0's KV free (KV 1 -> 2), G0 scores 3.5 and G1 4 (its KV free too): G1.
    With G0's KV free and a full match (prefix 1 -> 3), G0 scores 5: G0. With that full match and G0's KV three
    quarters used (768 of 1024 tokens: KV 0.25 -> 0.5), G0 scores 3.5: G1 again."""
    half = cache_of(Segment(1, 20))
    full = cache_of(*PROMPT)
    others = {"S2": {"queued": 3, "residency": {"b": "ACTIVE"}}, "S3": {"alive": False}}
    for g0, expected in (({"caches": {"a": half}}, G1), ({"caches": {"a": full}}, G0),
                         ({"caches": {"a": full}, "running_tokens": {"a": 768}}, G1)):
        snap = snapshot(tiny_cluster, G0={"queued": 6, **g0}, G1={"residency": {"a": "ACTIVE"}}, **others)
        assert placed(llmd(tiny_cluster, snap, [ready("s", "a", prompt=PROMPT)]), "s") == [expected]


def test_llmd_scorer_spreads_a_round_by_queue_and_follows_the_prefixes_it_routed(tiny_cluster):
    warm = {"residency": {"a": "ACTIVE"}}
    snap = snapshot(tiny_cluster, G0=warm, G1=warm, S2=warm, S3=warm)
    # No prompt blocks: each pick lengthens that queue, so the next goes elsewhere (ties: the device listed first).
    assert placed(llmd(tiny_cluster, snap, [ready("s", "a", 3)]), "s") == [G0, G1, S2]
    # The same prompt three times: after the first, G0 holds it (prefix 1 -> 3 outweighs its queue score).
    assert placed(llmd(tiny_cluster, snap, [ready("s", "a", 3, prompt=PROMPT)]), "s") == [G0, G0, G0]
