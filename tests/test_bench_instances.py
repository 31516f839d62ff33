"""Benchmark instances: workflows per instance, arrival rates that count model loads, cold and warm regimes.

The tiny cluster (conftest.py): 4 devices (fast x2 of 10 GiB, slow x2 of 5 GiB); footprints a 3, b 4, c 6 GiB
(c does not fit `slow`); every cold load takes 10 s on fast, 20 s on slow.
"""

from __future__ import annotations

import random

import pytest

from fate_ray.bench.instances import (
    WORKFLOWS_PER_INSTANCE,
    Instance,
    agentic_instances,
    chunks,
    repeated,
    suite_instances,
)
from fate_ray.bench.regimes import warm_placement, with_regimes
from fate_ray.cli import WORKFLOWS_PER_INSTANCE as CLI_DEFAULT
from fate_ray.cli import build_parser
from fate_ray.cost import CostEstimator
from fate_ray.sim.arrivals import arrivals, best_case_work_by_model, best_case_work_s, poisson_rate_per_s
from fate_ray.sim.simulator import SimConfig, simulate
from fate_ray.workload import Stage, TextPart, Workflow, stable_key


def workflow(name: str, stages: list[tuple[str, str, int]]) -> Workflow:
    """Independent stages (id, model, requests), each request 64 prompt tokens and 16 output tokens."""
    built = {sid: Stage(sid, model, (), n, tuple((TextPart(stable_key(name, sid, j), 64),) for j in range(n)), 16,
                        32, n > 1) for sid, model, n in stages}
    return Workflow(name, name, 0.0, built, tuple(built))


# --- workflows per instance ------------------------------------------------------------------------------------

def test_repeated_gives_whole_rounds_and_chunks_give_exactly_n():
    ws = [workflow(f"w{k}", [("s", "a", 1)]) for k in range(6)]
    assert len(repeated(ws, 50)) == 54 and repeated(ws, 50)[:6] == tuple(ws)  # 9 rounds of 6
    assert len(repeated(ws[:1], 50)) == 50
    groups = chunks(ws, 4)
    assert [len(g) for g in groups] == [4, 4]
    assert groups[1] == (ws[4], ws[5], ws[0], ws[1])  # the last one topped up from the start
    assert chunks(ws, 50)[0] == tuple(ws * 9)[:50]  # fewer than n: cycled
    assert chunks([], 5) == []


def test_smoke_and_prefix_reuse_instances_hold_at_least_n_workflows_in_both_regimes(mixed_cluster):
    smoke = suite_instances("smoke", mixed_cluster, workflows_per_instance=7)
    assert [i.name for i in smoke] == ["examples-mixed@cold", "examples-mixed@warm", "examples-batch@cold",
                                       "examples-batch@warm"]
    assert all(len(i.workflows) >= 7 for i in smoke)
    assert [i.group for i in smoke] == ["cold", "warm", "cold", "warm"]
    reuse = suite_instances("prefix-reuse", mixed_cluster, workflows_per_instance=3)
    assert len(reuse) == 40 and all(len(i.workflows) == 3 for i in reuse)
    assert reuse[0].name == "map_reduce-s0@cold" and reuse[1].group == "warm sharing=0"
    assert WORKFLOWS_PER_INSTANCE == CLI_DEFAULT == 50
    args = build_parser().parse_args(["bench", "--suite", "agentic", "--workflows-per-instance", "12"])
    assert args.workflows_per_instance == 12


def test_agentic_needs_dags_and_takes_sessions_n_at_a_time(tmp_path, mixed_cluster):
    from fate_ray.schema.errors import InputError

    with pytest.raises(InputError, match="agentic suite needs --dags"):
        agentic_instances([], mixed_cluster)
    lines = [f'{{"timestamp": {k}, "input": "hello {k}", "output": "hi", "session_id": "s{k % 3}"}}'
             for k in range(9)]
    (tmp_path / "trace.jsonl").write_text("\n".join(lines) + "\n")
    (instance,) = agentic_instances([str(tmp_path)], mixed_cluster, workflows_per_instance=5)
    assert instance.name == f"agentic-{tmp_path.name}" and instance.arrival == "poisson"
    assert [w.workflow_id for w in instance.workflows] == ["s0", "s1", "s2", "s0", "s1"]
    assert all(len(w.stages) == 3 for w in instance.workflows)


# --- arrival rates -----------------------------------------------------------------------------------------------

def test_poisson_rate_counts_the_loads_of_the_replicas_the_work_needs(tiny_cluster):
    """c carries most of the work: at 70% of 4 devices it keeps min(2 fitting devices, ceil(2.8 x share)) = 2
    devices busy, a needs 1; each load at the fastest cold load, 10 s. rate = 0.7 x 4 x N / (N x W + 30)."""
    est = CostEstimator(tiny_cluster)
    w = workflow("w", [("big", "c", 8), ("small", "a", 1)])
    work = best_case_work_by_model(w, est)
    assert work["c"] / sum(work.values()) > 1 / 2.8 and sum(work.values()) == pytest.approx(best_case_work_s(w, est))
    n = 10
    rate = 0.7 * 4 * n / (n * best_case_work_s(w, est) + 2 * 10 + 1 * 10)
    assert poisson_rate_per_s([w] * n, est, 0.7) == pytest.approx(rate)
    stream = arrivals([w] * n, "poisson", est, seed=3)
    rng = random.Random(stable_key("arrivals", 3))
    assert stream[1].arrival_s == pytest.approx(rng.expovariate(rate))
    assert [s.workflow_id for s in stream] == [f"w#{k}" for k in range(n)]
    work_only = 0.7 * 4 / best_case_work_s(w, est)
    assert rate < work_only  # the loads lower the rate


def test_one_model_is_loaded_on_at_most_the_devices_that_fit_it(tiny_cluster):
    """Only c: ceil(2.8 x 1) = 3 replicas wanted, but c fits 2 devices."""
    est = CostEstimator(tiny_cluster)
    w = workflow("w", [("s", "c", 4)])
    assert poisson_rate_per_s([w] * 4, est, 0.7) == pytest.approx(2.8 * 4 / (4 * best_case_work_s(w, est) + 20))


# --- regimes -----------------------------------------------------------------------------------------------------

def test_warm_placement_by_hand(tiny_cluster):
    """Requests c 3, a 2, b 1. Pass 1: c -> gpu0, a -> gpu1, b -> gpu2. Pass 2 (cursor at gpu3): c does not fit
    slow gpu3 and gpu0 holds it -> gpu1 (7 GiB free); a -> gpu3 (gpu2 has 1 GiB left); b -> gpu0 (4 GiB left).
    Pass 3 places nothing."""
    w = workflow("w", [("s1", "c", 3), ("s2", "a", 2), ("s3", "b", 1)])
    placement = dict(warm_placement([w], tiny_cluster))
    assert placement == {"n1/gpu0": ("c", "b"), "n1/gpu1": ("a", "c"), "n2/gpu2": ("b",), "n2/gpu3": ("a",)}
    memory = {d.device_id: tiny_cluster.device_types[d.type].memory_gib for d in tiny_cluster.devices}
    for device, models in placement.items():
        assert sum(tiny_cluster.models[m].footprint_gib for m in models) <= memory[device]


def test_regimes_share_workflows_and_arrivals_and_warm_runs_start_loaded(tiny_cluster):
    w = workflow("w", [("s1", "a", 2), ("s2", "b", 1)])
    cold, warm = with_regimes([Instance("x", (w,) * 4, group="g")], tiny_cluster)
    assert (cold.name, cold.group, cold.initial_models) == ("x@cold", "cold g", ())
    assert (warm.name, warm.group, warm.regime) == ("x@warm", "warm g", "warm")
    est = CostEstimator(tiny_cluster)
    assert cold.realise(1, est) == warm.realise(1, est)
    runs = {i.regime: simulate(tiny_cluster, i.realise(0, est), "round_robin",
                               SimConfig(seed=0, initial_models=i.initial_models)) for i in (cold, warm)}
    assert runs["warm"].loads < runs["cold"].loads
    assert not runs["warm"].failed and len(runs["warm"].completions_s) == 4
