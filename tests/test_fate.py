"""The FATE planner: each CP-SAT constraint block, the solver-agnostic plan check, the greedy assignment, the
candidate scores term by term (end to end in the simulator: test_fate_sim.py).

Unit tests use the tiny cluster (conftest): G0 = n1/gpu0 and G1 = n1/gpu1 (fast, 10 GiB, concurrency 2),
S2 = n2/gpu2 and S3 = n2/gpu3 (slow, 5 GiB, concurrency 1); models a (3 GiB), b (4 GiB), c (6 GiB, fast only);
load 10 s / wake 1 s on fast, 20 s / 2 s on slow. The default request (100-token prompt, 10 output tokens) takes
1.1 s on a fast device and 2.15 s on a slow one. CP-SAT models are built from hand-made `Candidate`s with chosen
numbers, so the expected times are exact (integer milliseconds in the model).
"""

from __future__ import annotations

from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ortools.sat.python import cp_model

from fate_ray.bench.planner_scale import scaled_cluster, synthetic_round
from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.policies import Assignment, Plan, PolicyContext, ReadyStage, make_policy
from fate_ray.policies.fate.config import FateConfig
from fate_ray.policies.fate.cpsat import PrefixPair, RoundModel
from fate_ray.policies.fate.greedy import RoundLedger, greedy_counts
from fate_ray.policies.fate.planner import FatePolicy
from fate_ray.policies.fate.rollout import horizon
from fate_ray.policies.fate.scoring import Candidate, Scorer, Terms
from fate_ray.policies.fate.validate import InvalidPlan, validate_plan
from fate_ray.prefetch import generic_prefetch
from fate_ray.progress import DagInfo
from fate_ray.state import ClusterSnapshot, DeviceSnapshot
from fate_ray.workload import ContextPart, Stage, TextPart

G0, G1, S2, S3 = "n1/gpu0", "n1/gpu1", "n2/gpu2", "n2/gpu3"
NAMES = {G0: "G0", G1: "G1", S2: "S2", S3: "S3"}
# Generous limits: these models are tiny, so the solver proves optimality well within them.
SOLVE = {"time_limit_ms": 10_000.0, "deterministic_limit": 10.0}


# ---------------------------------------------------------------------------------------------------------------
# Hand-built rounds


def device(cluster, device_id: str, *, free_at_s: float = 0.0, alive: bool = True, residency: dict | None = None,
           busy: frozenset = frozenset(), concurrency: int | None = None) -> DeviceSnapshot:
    d = next(d for d in cluster.devices if d.device_id == device_id)
    dtype = cluster.device_types[d.type]
    return DeviceSnapshot(
        device=d, memory_gib=dtype.memory_gib, concurrency=concurrency or dtype.concurrency, alive=alive,
        residency=MappingProxyType(residency or {}), caches=MappingProxyType({}), busy_models=busy,
        free_at_s=free_at_s, running_shards=0, queued_requests=0,
    )


def snapshot(cluster, now_s: float = 0.0, **per_device) -> ClusterSnapshot:
    """`snapshot(cluster, S3={"alive": False})`; keyword names are G0/G1/S2/S3."""
    return ClusterSnapshot(now_s, tuple(device(cluster, i, **per_device.get(NAMES[i], {})) for i in NAMES))


def stage(stage_id: str, model: str = "a", n: int = 1, *, shardable: bool = True, rank_s: float = 1.0,
          dag: DagInfo | None = None, prompt_tokens: int = 100) -> ReadyStage:
    return ReadyStage(("w", stage_id), model, tuple(range(n)),
                      tuple(RequestShape(prompt_tokens, (), 10) for _ in range(n)), shardable, rank_s, 0.0, {}, dag)


def cand(s: ReadyStage, device_id: str, *, conc: int = 1, queue_s: float = 0.0, act_s: float = 0.0,
         per_request_s: float = 1.0, offset_s: float = 0.0) -> Candidate:
    """A candidate with chosen terms; `offset_s` (look-ahead + reach) is put in the reach term."""
    n = len(s.request_indices)
    service_s = per_request_s * n
    terms = Terms(queue_s, act_s, service_s, 0.0, 0.0, 0.0, 0.0, offset_s)
    return Candidate(s.key, device_id, s.model, conc, terms, queue_s + act_s + service_s + offset_s, n)


def round_model(cluster, frontier, cands, cfg: FateConfig | None = None, snap: ClusterSnapshot | None = None,
                pairs=(), evict_ms=None) -> RoundModel:
    cfg = cfg or FateConfig(**SOLVE)
    by_stage = {s.key: [c for c in cands if c.stage == s.key] for s in frontier}
    return RoundModel(frontier, by_stage, snap or snapshot(cluster), cluster, cfg, list(pairs), evict_ms or {})


def solve_values(rm: RoundModel) -> tuple[str, cp_model.CpSolver]:
    """Solve the model and keep the solver, to read T_d, the makespan, F_s (RoundModel.solve returns counts only)."""
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = 10.0
    return solver.status_name(solver.solve(rm.m)), solver


# ---------------------------------------------------------------------------------------------------------------
# CP-SAT blocks (1)-(9)


def test_1_every_request_is_placed_and_a_stage_cannot_be_left_out(tiny_cluster):
    s = stage("s", n=5)
    rm = round_model(tiny_cluster, [s], [cand(s, G0), cand(s, G1)])
    result = rm.solve()
    assert result.status == "OPTIMAL"
    assert sum(result.counts[s.key].values()) == 5

    forbidden = round_model(tiny_cluster, [s], [cand(s, G0), cand(s, G1)])
    for d in (G0, G1):
        forbidden.m.add(forbidden.x[(s.key, d)] == 0)  # "place it nowhere this round"
    assert forbidden.solve().status == "INFEASIBLE"


def test_2_shards_respect_min_shard(tiny_cluster):
    # 4 requests of 1 s; G1 has a 2 s backlog. Without a floor the best split is 3 on G0 + 1 on G1 (both end at 3 s).
    s = stage("s", n=4)
    cands = [cand(s, G0), cand(s, G1, queue_s=2.0)]
    assert round_model(tiny_cluster, [s], cands, FateConfig(min_shard=1, **SOLVE)).solve().counts[s.key] == \
        {G0: 3, G1: 1}
    counts = round_model(tiny_cluster, [s], cands, FateConfig(min_shard=2, **SOLVE)).solve().counts[s.key]
    assert sum(counts.values()) == 4 and min(counts.values()) >= 2

    tiny = round_model(tiny_cluster, [s], cands, FateConfig(min_shard=2, **SOLVE))
    tiny.m.add(tiny.r[(s.key, G1)] == 1)
    assert tiny.solve().status == "INFEASIBLE"


def test_2_a_stage_smaller_than_two_min_shards_is_not_split(tiny_cluster):
    s = stage("s", n=3)  # < 2 * min_shard: one device, although a 2 + 1 split on two idle devices would be faster
    counts = round_model(tiny_cluster, [s], [cand(s, G0), cand(s, G1)], FateConfig(min_shard=2, **SOLVE)) \
        .solve().counts[s.key]
    assert list(counts.values()) == [3]


@pytest.mark.parametrize("k", [1, 2])
def test_3_a_stage_uses_at_most_k_devices(tiny_cluster, k):
    s = stage("s", n=8)  # on 4 idle devices the unbounded optimum would use all four (2 requests each)
    cands = [cand(s, d) for d in (G0, G1, S2, S3)]
    counts = round_model(tiny_cluster, [s], cands, FateConfig(max_shards=k, **SOLVE)).solve().counts[s.key]
    assert len(counts) == k and sum(counts.values()) == 8

    too_many = round_model(tiny_cluster, [s], cands, FateConfig(max_shards=k, **SOLVE))
    for d in (G0, G1, S2)[: k + 1]:
        too_many.m.add(too_many.x[(s.key, d)] == 1)
    assert too_many.solve().status == "INFEASIBLE"


def test_3_an_unsplittable_stage_runs_on_exactly_one_device(tiny_cluster):
    s = stage("s", n=8, shardable=False)
    cands = [cand(s, d) for d in (G0, G1, S2, S3)]
    counts = round_model(tiny_cluster, [s], cands).solve().counts[s.key]
    assert len(counts) == 1 and sum(counts.values()) == 8

    two = round_model(tiny_cluster, [s], cands)
    two.m.add(two.x[(s.key, G0)] == 1)
    two.m.add(two.x[(s.key, G1)] == 1)
    assert two.solve().status == "INFEASIBLE"


def test_4_two_stages_of_one_model_pay_its_load_once(tiny_cluster):
    # Model a is absent on G0 (10 s load); two 1-request stages of a, 1 s each, G0 the only candidate.
    one, two = stage("one"), stage("two")
    rm = round_model(tiny_cluster, [one, two], [cand(one, G0, act_s=10.0), cand(two, G0, act_s=10.0)])
    status, solver = solve_values(rm)
    assert status == "OPTIMAL"
    assert len(rm.load) == 1
    assert solver.value(rm.finish_d[G0]) == 12_000  # 10 s load + 1 s + 1 s, not 22 s
    assert solver.value(rm.makespan) == 12_000


def test_4_stages_of_two_models_pay_two_loads(tiny_cluster):
    one, two = stage("one", "a"), stage("two", "b")  # a + b = 7 GiB fit G0's 10 GiB
    rm = round_model(tiny_cluster, [one, two], [cand(one, G0, act_s=10.0), cand(two, G0, act_s=10.0)])
    status, solver = solve_values(rm)
    assert status == "OPTIMAL" and len(rm.load) == 2
    assert solver.value(rm.finish_d[G0]) == 22_000


def test_5_a_load_evicts_the_resident_models_it_does_not_fit_beside(tiny_cluster):
    # S2 (5 GiB) holds a (3 GiB), idle; b (4 GiB) loads there only if a goes. Evicting a costs its reload (another
    # frontier stage needs a and no other device has it): 40 s, counted once, outweighs S3's 10 s queue, counted in
    # the makespan and in the stage's finish (x3 in all): b goes to S3.
    snap = snapshot(tiny_cluster, S2={"residency": {"a": "ACTIVE"}})
    sb = stage("sb", "b")
    cands = [cand(sb, S2, act_s=20.0), cand(sb, S3, act_s=20.0, queue_s=10.0)]
    assert round_model(tiny_cluster, [sb], cands, snap=snap).solve().counts == {sb.key: {S2: 1}}
    rm = round_model(tiny_cluster, [sb], cands, snap=snap, evict_ms={("a", S2): 40_000})
    assert rm.solve().counts == {sb.key: {S3: 1}}
    rm = round_model(tiny_cluster, [sb], cands[:1], snap=snap, evict_ms={("a", S2): 40_000})
    status, solver = solve_values(rm)
    assert status == "OPTIMAL" and solver.value(rm.keep[("a", S2)]) == 0  # forced there: a is evicted


def test_5_two_loads_on_one_device_need_not_fit_together(tiny_cluster):
    # a (3 GiB) and b (4 GiB) do not fit S2 (5 GiB) together, but S2 runs them one after the other (b's load evicts
    # a once a's stage ran): 20 + 1 + 20 + 1 s there beats S3's 100 s backlog.
    sa, sb = stage("sa", "a"), stage("sb", "b")
    cands = [cand(s, d, act_s=20.0, queue_s=100.0 if d == S3 else 0.0) for s in (sa, sb) for d in (S2, S3)]
    assert round_model(tiny_cluster, [sa, sb], cands).solve().counts == {sa.key: {S2: 1}, sb.key: {S2: 1}}


def test_5_loads_are_possible_beside_models_that_are_busy(tiny_cluster):
    # G0 runs model c (6 GiB, busy): a and b load there once c's shards end (c may stay beside either, not both).
    snap = snapshot(tiny_cluster, G0={"residency": {"c": "ACTIVE"}, "busy": frozenset({"c"})})
    sa, sb = stage("sa", "a"), stage("sb", "b")
    both = [cand(sa, G0, act_s=10.0), cand(sb, G0, act_s=10.0)]
    assert round_model(tiny_cluster, [sa, sb], both, snap=snap).solve().counts == {sa.key: {G0: 1}, sb.key: {G0: 1}}


MODELS = ("a", "b", "c")
RESIDENCY = st.fixed_dictionaries({m: st.sampled_from(["ACTIVE", "SLEEPING", "ABSENT"]) for m in MODELS})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(residency=st.lists(RESIDENCY, min_size=4, max_size=4), busy=st.lists(st.booleans(), min_size=4, max_size=4),
       queues=st.lists(st.sampled_from([0.0, 5.0, 50.0]), min_size=4, max_size=4),
       stages=st.lists(st.tuples(st.sampled_from(MODELS), st.integers(1, 6), st.booleans()), min_size=2, max_size=6))
def test_the_greedy_assignment_is_always_feasible_for_the_cp_sat_model(tiny_cluster, residency, busy, queues, stages):
    """CP-SAT never reports INFEASIBLE where greedy placed the round: the model with every x and r fixed to the
    greedy answer (its warm start) is feasible, whatever is resident, asleep or busy where."""
    per_device = {}
    for name, res, is_busy, queue_s in zip(NAMES.values(), residency, busy, queues):
        active = frozenset(m for m, r in res.items() if r == "ACTIVE")
        per_device[name] = {"residency": {m: r for m, r in res.items() if r != "ABSENT"}, "free_at_s": queue_s,
                            "busy": active if is_busy else frozenset()}
    snap = snapshot(tiny_cluster, **per_device)
    frontier = [stage(f"s{i}", m, n, shardable=split, rank_s=float(i)) for i, (m, n, split) in enumerate(stages)]
    policy = FatePolicy(PolicyContext(tiny_cluster, CostEstimator(tiny_cluster)), FateConfig(**SOLVE))
    cands = policy.scorer.score(snap, frontier)
    greedy = greedy_counts(frontier, cands, policy.cfg)
    rm = RoundModel(frontier, cands, snap, tiny_cluster, policy.cfg, policy._pairs(frontier, cands),
                    policy._evict_ms(snap, frontier))
    for (key, d), x in rm.x.items():
        n = greedy.get(key, {}).get(d, 0)
        rm.m.add(x == (1 if n else 0))
        rm.m.add(rm.r[(key, d)] == n)
    assert rm.solve().status in ("OPTIMAL", "FEASIBLE")


def test_6_to_8_a_stage_avoids_a_device_with_a_huge_queue(tiny_cluster):
    s = stage("s")
    cands = [cand(s, G0, queue_s=100.0), cand(s, G1)]
    assert round_model(tiny_cluster, [s], cands).solve().counts == {s.key: {G1: 1}}

    forced = round_model(tiny_cluster, [s], cands)
    forced.m.add(forced.x[(s.key, G0)] == 1)
    status, solver = solve_values(forced)
    assert status == "OPTIMAL"
    assert solver.value(forced.finish_d[G0]) == 101_000            # (6) backlog + work
    assert solver.value(forced.makespan) >= 101_000                # (7)
    assert solver.value(forced.finish_s[s.key]) >= 101_000         # (8) the stage ends with its device


def test_6_to_8_the_finish_time_bound_allows_the_worst_placement_and_ignores_the_rest_of_the_frontier(tiny_cluster):
    # The big-M of (8) counts this round's stages only, not the rest of a large frontier (whose work made it so
    # large that 256-stage rounds ran into the wall-clock limit), and still admits the worst placement: every stage
    # behind the longest backlog, with the load.
    head = [stage(f"s{i}", n=3, shardable=False, rank_s=float(i)) for i in range(4)]
    tail = stage("tail", n=16)
    by_stage = {s.key: [cand(s, d, queue_s=50.0 if d == S3 else 0.0, act_s=20.0, per_request_s=2.0) for d in (G0, S3)]
                for s in head}
    by_stage[tail.key] = [cand(tail, d, per_request_s=500.0) for d in (G0, S3)]
    rm = RoundModel(head, by_stage, snapshot(tiny_cluster), tiny_cluster, FateConfig(**SOLVE), [], {})
    assert rm.big_m_ms == 50_000 + 20_000 + 4 * 3 * 2_000 + 1  # the tail's 8,000 s are not in it
    for s in head:
        rm.m.add(rm.x[(s.key, S3)] == 1)
    status, solver = solve_values(rm)
    assert status == "OPTIMAL" and solver.value(rm.makespan) == 94_000  # backlog + one shared load + all the work


def test_6_device_finish_spreads_work_over_its_concurrent_slots(tiny_cluster):
    s = stage("s", n=4)  # 4 x 1 s on a device with 2 slots: 2 s
    rm = round_model(tiny_cluster, [s], [cand(s, G0, conc=2)])
    status, solver = solve_values(rm)
    assert status == "OPTIMAL" and solver.value(rm.finish_d[G0]) == 2_000


def test_8_each_stage_finishes_with_the_device_it_runs_on(tiny_cluster):
    short, long_ = stage("short", rank_s=1.0), stage("long", rank_s=2.0)
    cands = [cand(short, G0), cand(short, G1), cand(long_, G0, per_request_s=3.0), cand(long_, G1, per_request_s=3.0)]
    rm = round_model(tiny_cluster, [short, long_], cands)
    status, solver = solve_values(rm)
    assert status == "OPTIMAL"
    # Apart, the short stage ends at 1 s and the long one at 3 s (together both would end at 4 s).
    on = {s.key: next(d for d in (G0, G1) if solver.value(rm.x[(s.key, d)])) for s in (short, long_)}
    assert on[short.key] != on[long_.key]
    assert (solver.value(rm.finish_s[short.key]), solver.value(rm.finish_s[long_.key])) == (1_000, 3_000)
    assert solver.value(rm.makespan) == 3_000


def test_8_on_one_device_the_older_workflows_stage_finishes_first(tiny_cluster):
    # Both stages can only run on G0 (one slot, 2 s backlog): the older workflow's is ahead in the queue order,
    # whatever the ranks, and the younger one finishes after both.
    old = ReadyStage(("old", "s"), "a", (0,), (RequestShape(100, (), 10),), True, 1.0, 0.0, {}, None)
    young = ReadyStage(("young", "s"), "a", (0,), (RequestShape(100, (), 10),), True, 9.0, 5.0, {}, None)
    cands = [cand(old, G0, queue_s=2.0, per_request_s=1.0), cand(young, G0, queue_s=2.0, per_request_s=3.0)]
    rm = round_model(tiny_cluster, [young, old], cands, snap=snapshot(tiny_cluster, now_s=10.0))
    status, solver = solve_values(rm)
    assert status == "OPTIMAL"
    assert (solver.value(rm.finish_s[old.key]), solver.value(rm.finish_s[young.key])) == (3_000, 6_000)


@pytest.mark.parametrize("bonus_ms, together", [(0, False), (100_000, True)])
def test_9_stages_sharing_a_long_prefix_are_co_located_when_the_bonus_is_large(tiny_cluster, bonus_ms, together):
    # Two idle devices: apart, both end at 1 s; together, at 2 s. A 100 s prefill saving outweighs that.
    one, two = stage("one"), stage("two")
    cands = [cand(one, G0), cand(one, G1), cand(two, G0), cand(two, G1)]
    counts = round_model(tiny_cluster, [one, two], cands, pairs=[PrefixPair(one.key, two.key, bonus_ms)]) \
        .solve().counts
    assert (counts[one.key] == counts[two.key]) is together


# ---------------------------------------------------------------------------------------------------------------
# validate_plan


def _plan(*assignments: tuple[str, str, tuple[int, ...]]) -> Plan:
    return Plan(tuple(Assignment(("w", sid), d, idx) for sid, d, idx in assignments))


@pytest.fixture
def checked_round(tiny_cluster):
    """A map stage of a (6 requests), an unsplittable stage of c (2 requests); S3 is dead."""
    frontier = [stage("map", "a", 6), stage("one", "c", 2, shardable=False)]
    snap = snapshot(tiny_cluster, S3={"alive": False})

    def check(plan: Plan, cfg: FateConfig | None = None) -> None:
        validate_plan(plan, frontier, snap, tiny_cluster, cfg or FateConfig())

    return check


def test_validate_plan_accepts_a_correct_plan(checked_round):
    checked_round(_plan(("map", G0, (0, 1, 2)), ("map", S2, (3, 4, 5)), ("one", G1, (0, 1))))


@pytest.mark.parametrize("plan, cfg, message", [
    (_plan(("map", G0, (0, 1, 2)), ("map", S2, (3, 4)), ("one", G1, (0, 1))), None, "requests placed"),
    (_plan(("map", G0, (0, 1, 2)), ("map", S2, (2, 3, 4, 5)), ("one", G1, (0, 1))), None, "requests placed"),
    (_plan(("map", G0, (0, 1, 2)), ("map", S3, (3, 4, 5)), ("one", G1, (0, 1))), None, "not a live device"),
    (_plan(("map", G0, (0, 1, 2, 3, 4, 5)), ("one", S2, (0, 1))), None, "not a live device"),
    (_plan(("map", G0, (0, 1)), ("map", G1, (2, 3)), ("map", S2, (4, 5)), ("one", G1, (0, 1))),
     FateConfig(max_shards=2), "3 shards"),
    (_plan(("map", G0, (0, 1, 2, 3, 4)), ("map", S2, (5,)), ("one", G1, (0, 1))), None, "smaller than 2"),
    (_plan(("map", G0, (0, 1, 2, 3, 4, 5)), ("one", G0, (0,)), ("one", G1, (1,))), None, "2 shards"),
], ids=["missing", "duplicated", "dead-device", "does-not-fit", "too-many-shards", "tiny-shard",
        "unsplittable-split"])
def test_validate_plan_rejects(checked_round, plan, cfg, message):
    with pytest.raises(InvalidPlan, match=message):
        checked_round(plan, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Greedy


def test_greedy_pays_a_load_once_and_puts_the_second_stage_where_the_model_is_loading():
    cfg = FateConfig()
    first, second = stage("first", rank_s=2.0), stage("second", rank_s=1.0)
    cands = {s.key: [cand(s, G0, conc=2, act_s=10.0), cand(s, G1, conc=2, act_s=10.0)] for s in (first, second)}
    ledger = RoundLedger()
    counts = greedy_counts([second, first], cands, cfg, ledger)
    assert counts == {first.key: {G0: 1}, second.key: {G0: 1}}  # G0: ready at 11 / 2 = 5.5 s; G1 at a 10 s load
    assert ledger.activation_s(cands[second.key][0]) == 0.0
    assert ledger.activation_s(cands[second.key][1]) == 10.0


def test_greedy_water_fills_a_map_stage_over_the_fastest_devices():
    s = stage("map", n=16)
    cands = {s.key: [cand(s, G0, conc=2), cand(s, G1, conc=2), cand(s, S2, per_request_s=5.0),
                     cand(s, S3, per_request_s=5.0)]}
    assert greedy_counts([s], cands, FateConfig()) == {s.key: {G0: 8, G1: 8}}  # each ends at 4 s; a slow one at 5


def test_greedy_folds_shards_below_min_shard():
    s = stage("map", n=6)  # water-filling 4 equal devices gives 2, 2, 1, 1
    cands = {s.key: [cand(s, d) for d in (G0, G1, S2, S3)]}
    assert sorted(greedy_counts([s], cands, FateConfig(min_shard=1))[s.key].values()) == [1, 1, 2, 2]
    counts = greedy_counts([s], cands, FateConfig(min_shard=2))[s.key]
    assert sum(counts.values()) == 6 and min(counts.values()) >= 2


# ---------------------------------------------------------------------------------------------------------------
# Scorer terms


def scores(cluster, snap, frontier, **settings) -> dict:
    """{(stage id, device id): Terms} from the real Scorer."""
    scorer = Scorer(FateConfig(**settings), cluster, CostEstimator(cluster))
    return {(c.stage[1], c.device_id): c.terms for cs in scorer.score(snap, frontier).values() for c in cs}


def test_activation_term_is_load_wake_or_nothing(tiny_cluster):
    snap = snapshot(tiny_cluster, G1={"residency": {"a": "SLEEPING"}}, S2={"residency": {"a": "ACTIVE"}})
    terms = scores(tiny_cluster, snap, [stage("s")])
    assert {d: terms[("s", d)].activation_s for d in NAMES} == {G0: 10.0, G1: 1.0, S2: 0.0, S3: 20.0}


def continued_stage() -> ReadyStage:
    """Parent p (model a, a 400-token prompt, 10 output tokens expected) and a child c that continues p's
    conversation with the same model: c's prompt starts with p's 410-token context."""
    parent = Stage("p", "a", (), 1, ((TextPart(1, 400),),), 10, 20)
    child = Stage("c", "a", ("p",), 1, ((ContextPart("p", 0), TextPart(2, 20)),), 10, 20, continues="p")
    dag = DagInfo({"p": parent, "c": child}, {"p": ("c",), "c": ()}, {"p": [400], "c": [430]},
                  {"p": 10.0, "c": 5.0})
    return stage("p", dag=dag, prompt_tokens=400)


def test_a_child_continuing_the_stage_finds_its_context_where_it_ran(tiny_cluster):
    """The rollout places the child where p ran (its 410-token context is cached there) and counts the saving:
    410 / 100 tok/s = 4.1 s on a fast device, 8.2 s on a slow one, weighted by rank(c) / rank(p) = 0.5. A slow
    device's own saving is larger, but the child still runs on its slow speed: the fast devices win."""
    snap = snapshot(tiny_cluster, **{n: {"residency": {"a": "ACTIVE"}} for n in NAMES.values()})
    p = continued_stage()
    scorer = Scorer(FateConfig(), tiny_cluster, CostEstimator(tiny_cluster))
    scorer.score(snap, [p])  # builds the round's rollout
    stages = horizon(p, FateConfig(), tiny_cluster)
    options = {h.stage_id: scorer._options(p.dag, h, [d for d in snap.devices]) for h in stages}
    g0 = next(d for d in snap.devices if d.device.device_id == G0)
    assert scorer.rollout.cost(p, g0, 5.0, 2.5, (), stages, options).locality_s == pytest.approx(-0.5 * 4.1)
    terms = scores(tiny_cluster, snap, [p])
    assert min(terms, key=lambda k: terms[k].immediate_s + terms[k].future_s)[1] in (G0, G1)
    off = scores(tiny_cluster, snap, [p], locality=False)
    assert all(off[("p", d)].future_locality_s == 0.0 for d in NAMES)


def test_horizon_zero_scores_no_future_and_no_reach(tiny_cluster):
    snap = snapshot(tiny_cluster, S2={"residency": {"b": "ACTIVE"}})
    frontier = [continued_stage(), stage("x", "b"), stage("y", "c")]
    futures = lambda t: (t.eviction_s, t.future_locality_s, t.future_prefix_s, t.future_residency_s, t.reach_s)  # noqa: E731
    full = scores(tiny_cluster, snap, frontier)
    assert any(any(futures(t)) for t in full.values())  # not vacuous: the default horizon scores something
    h0 = scores(tiny_cluster, snap, frontier, horizon_hops=0)
    assert h0.keys() == full.keys()
    assert all(futures(t) == (0.0,) * 5 for t in h0.values())


def test_reach_penalises_a_small_stage_on_one_of_few_devices_a_pending_model_fits(tiny_cluster):
    frontier = [stage("small", "a"), stage("big", "c")]  # c fits only the two fast devices
    terms = scores(tiny_cluster, snapshot(tiny_cluster), frontier)
    # Occupancy of G0 by `small`: (10 s load + 1.1 s) / 2 slots, times scarcity 1 / 2 devices.
    assert terms[("small", G0)].reach_s == pytest.approx(11.1 / 2 / 2)
    assert terms[("small", S2)].reach_s == 0.0  # c does not fit there: nothing is taken from it
    off = scores(tiny_cluster, snapshot(tiny_cluster), frontier, reach=False)
    assert all(t.reach_s == 0.0 for t in off.values())


def test_eviction_term_counts_evicting_the_only_active_copy_of_a_needed_model(tiny_cluster):
    frontier = [stage("x", "a"), stage("y", "b")]
    # S2 holds b (4 GiB): loading a (3 GiB) on its 5 GiB evicts b, which y needs and no other device holds.
    only = scores(tiny_cluster, snapshot(tiny_cluster, S2={"residency": {"b": "ACTIVE"}}), frontier)
    assert only[("x", S2)].eviction_s == 20.0  # reloading b cold on a slow device
    assert only[("x", G0)].eviction_s == 0.0
    # With another ACTIVE copy of b on G1, y does not depend on S2's.
    shared = scores(tiny_cluster, snapshot(tiny_cluster, S2={"residency": {"b": "ACTIVE"}},
                                           G1={"residency": {"b": "ACTIVE"}}), frontier)
    assert shared[("x", S2)].eviction_s == 0.0
    # Evicting a model no pending stage needs costs nothing.
    unneeded = scores(tiny_cluster, snapshot(tiny_cluster, S2={"residency": {"b": "ACTIVE"}}), frontier[:1])
    assert unneeded[("x", S2)].eviction_s == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The planner on rounds where decomposition matters


def test_a_decomposed_round_counts_the_head_stages_work_for_the_tail(make_cluster):
    cluster = make_cluster(fast={"concurrency": 1})
    active = {"residency": {"a": "ACTIVE"}}
    snap = snapshot(cluster, G0=active, G1={**active, "free_at_s": 5.0}, S2={"alive": False}, S3={"alive": False})
    head = stage("a-head", "a", shardable=False, rank_s=9.0, prompt_tokens=5000)  # 50.1 s on a fast device
    tail = stage("b-tail", "a", shardable=False, rank_s=1.0)  # 1.1 s
    policy = FatePolicy(PolicyContext(cluster, CostEstimator(cluster)), FateConfig(max_cpsat_stages=1))
    plan = policy.plan(snap, [head, tail])
    assert plan.solver_status == "DECOMPOSED"
    where = {a.stage[1]: a.device_id for a in plan.assignments}
    assert where["a-head"] == G0
    # G0 is busy with the head until 50.1 s; G1 frees at 5 s: the tail belongs on G1 (as CP-SAT alone places it).
    assert where["b-tail"] == G1


def test_contended_only_rounds_keep_the_greedy_answer_when_stages_do_not_compete(make_cluster):
    cluster = make_cluster(fast={"concurrency": 1})
    snap = snapshot(cluster, G0={"residency": {"a": "ACTIVE"}}, G1={"residency": {"b": "ACTIVE"}},
                    S2={"alive": False}, S3={"alive": False})
    cfg = FateConfig(cpsat_rounds="contended", **SOLVE)
    policy = FatePolicy(PolicyContext(cluster, CostEstimator(cluster)), cfg)
    # One unsplittable stage (of three requests, so the round is not TRIVIAL): nothing competes.
    plan = policy.plan(snap, [stage("one", "a", n=3, shardable=False)])
    assert plan.solver_status == "UNCONTENDED"
    # Two unsplittable stages, each best where its model is resident: each gets that device, CP-SAT is skipped.
    frontier = [stage("x", "a", shardable=False, rank_s=2.0), stage("y", "b", shardable=False, rank_s=1.0)]
    plan = policy.plan(snap, frontier)
    assert plan.solver_status == "UNCONTENDED"
    assert {a.stage[1]: a.device_id for a in plan.assignments} == {"x": G0, "y": G1}
    # Both want G0 (model a resident there): the second is displaced by the first, a contended round.
    both = [stage("x", "a", shardable=False, rank_s=2.0), stage("w", "a", shardable=False, rank_s=1.0)]
    assert policy.plan(snap, both).solver_status in ("OPTIMAL", "FEASIBLE")
    # A shardable stage split over both devices competes with itself: CP-SAT decides, as with the default.
    plan = policy.plan(snap, [stage("map", "a", n=8, rank_s=2.0), stage("z", "a", shardable=False)])
    assert plan.solver_status in ("OPTIMAL", "FEASIBLE")
    default = FatePolicy(PolicyContext(cluster, CostEstimator(cluster)), FateConfig(**SOLVE))
    assert default.plan(snap, frontier).solver_status in ("OPTIMAL", "FEASIBLE")


def parent_and_child(child_model: str) -> ReadyStage:
    """Parent p (model a) and a child of `child_model` that reads p's output (not continuing its context)."""
    parent = Stage("p", "a", (), 1, ((TextPart(1, 100),),), 10, 20)
    child = Stage("c", child_model, ("p",), 1, ((TextPart(2, 100),),), 10, 20)
    dag = DagInfo({"p": parent, "c": child}, {"p": ("c",), "c": ()}, {"p": [100], "c": [100]}, {"p": 3.0, "c": 1.0})
    return stage("p", dag=dag)


# FATE's prefetch became the Controller's generic prefetch (issue 8: every policy gets it), so these tests now check
# that rule (fate_ray/prefetch.py) on FATE's plans; FATE itself returns no prefetch, and its `prefetch=False`
# setting only opts it out of the Controller's (the Controller side: tests/test_controller.py).


def test_prefetch_loads_a_childs_absent_model_on_an_idle_device(tiny_cluster):
    estimator = CostEstimator(tiny_cluster)
    frontier = [parent_and_child("b")]
    plan = FatePolicy(PolicyContext(tiny_cluster, estimator)).plan(snapshot(tiny_cluster), frontier)
    (parent_device,) = {a.device_id for a in plan.assignments}
    assert plan.prefetch == ()
    prefetch = generic_prefetch(snapshot(tiny_cluster), frontier, {parent_device}, tiny_cluster, estimator)
    assert len(prefetch) == 1
    model, device_id = prefetch[0]
    assert model == "b" and device_id != parent_device and device_id in (G0, G1)  # the other fast device
    assert not FatePolicy(PolicyContext(tiny_cluster, estimator)).own_prefetch
    assert FatePolicy(PolicyContext(tiny_cluster, estimator), FateConfig(prefetch=False)).own_prefetch


def test_prefetch_does_not_load_a_model_the_same_plan_already_loads(tiny_cluster):
    # Nothing is resident; the parent (model a) is placed on some device, which loads a there for it. Its child
    # also uses a and can only start once the parent ended, i.e. once a is ACTIVE on the parent's device.
    estimator = CostEstimator(tiny_cluster)
    frontier = [parent_and_child("a")]
    plan = FatePolicy(PolicyContext(tiny_cluster, estimator)).plan(snapshot(tiny_cluster), frontier)
    placed_on = {a.device_id for a in plan.assignments}
    assert generic_prefetch(snapshot(tiny_cluster), frontier, placed_on, tiny_cluster, estimator) == ()


def test_a_scaled_cluster_has_its_own_devices_even_after_the_base_was_read(mixed_cluster):
    """A copy with other nodes must not report the original's devices (a cached_property copied by model_copy
    once returned 8 devices for every size)."""
    assert len(mixed_cluster.devices) == 8
    for size in (64, 256):
        scaled = scaled_cluster(mixed_cluster, size)
        assert len(scaled.devices) == size
        assert len({d.device_id for d in scaled.devices}) == size
    assert len(mixed_cluster.devices) == 8
    assert mixed_cluster.model_copy(update={"name": "renamed"}).devices == mixed_cluster.devices


def test_a_large_frontier_is_decomposed_into_a_valid_plan(mixed_cluster):
    cluster = scaled_cluster(mixed_cluster, 64)
    snap, frontier = synthetic_round(cluster, 256, 0)
    policy = make_policy("fate", PolicyContext(cluster, CostEstimator(cluster), 0))
    plan = policy.plan(snap, frontier)
    validate_plan(plan, frontier, snap, cluster, FateConfig())
    assert plan.solver_status == "DECOMPOSED"
