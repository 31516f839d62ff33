"""The simulator end to end: the shipped example workflows on the mixed H100/L4 cluster under every baseline.

After every run: the Controller's invariants hold, every workflow completes, and the trace of executed shards obeys
the DAG (a shard starts after every shard of its parent stages ended), each device's concurrency, and each device's
memory (the models running at once on a device fit in it). A run is a pure function of its seed. A worker that
dies mid-run loses no work and duplicates none.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from invariants import check_run

from fate_ray.cost import CostEstimator
from fate_ray.policies import BASELINES
from fate_ray.sim.arrivals import arrivals
from fate_ray.sim.simulator import SimConfig, SimResult, simulate

COPIES = 2  # each example is submitted twice, so instances of one DAG compete for devices and caches
MODES = ("poisson", "all_at_once")
EPS = 1e-9


def make_instances(cluster, workflows, mode: str, seed: int):
    return arrivals(list(workflows) * COPIES, mode, CostEstimator(cluster), seed)


def run(cluster, workflows, policy: str, mode: str = "poisson", seed: int = 0, **config) -> tuple[list, SimResult]:
    instances = make_instances(cluster, workflows, mode, seed)
    return instances, simulate(cluster, instances, policy, SimConfig(seed=seed, **config), record_trace=True)


@pytest.fixture(scope="module")
def runs(mixed_cluster, example_workflows):
    return {(policy, mode): run(mixed_cluster, example_workflows, policy, mode) for policy in BASELINES
            for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", BASELINES)
def test_every_run_completes_and_obeys_dependencies_concurrency_and_memory(mixed_cluster, runs, policy, mode):
    instances, result = runs[(policy, mode)]
    rows = check_run(mixed_cluster, instances, result)
    assert result.makespan_s > 0 and result.p95_s > 0
    assert {r["policy"] for r in rows} == {policy}


def test_the_examples_exercise_what_the_checks_are_about(mixed_cluster, runs):
    """Guards the checks above against passing vacuously: work overlaps, caches hit, models get (re)loaded."""
    _, result = runs[("round_robin", "all_at_once")]
    rows = result.trace_rows()
    assert len({r["device"] for r in rows}) == len(mixed_cluster.devices)
    assert any(r["parents"] for r in rows)
    assert result.loads > 0 and result.cached_tokens > 0
    by_device = defaultdict(list)
    for r in rows:
        by_device[r["device"]].append((r["start_s"], r["end_s"]))
    assert any(a_start < b_end and b_start < a_end for spans in by_device.values()
               for i, (a_start, a_end) in enumerate(spans) for b_start, b_end in spans[i + 1:])


@pytest.mark.parametrize("policy", BASELINES)
def test_a_run_is_a_pure_function_of_its_seed(mixed_cluster, example_workflows, runs, policy):
    _, first = runs[(policy, "poisson")]
    _, again = run(mixed_cluster, example_workflows, policy)
    assert (again.makespan_s, again.p95_s) == (first.makespan_s, first.p95_s)
    assert again.trace == first.trace
    _, other = run(mixed_cluster, example_workflows, policy, seed=1)
    assert other.trace != first.trace


@pytest.mark.parametrize("policy", BASELINES)
def test_a_worker_failure_loses_and_duplicates_nothing(mixed_cluster, example_workflows, runs, policy):
    _, healthy = runs[(policy, "poisson")]
    # The device this policy used most, so that every policy meets a failure mid-shard.
    rows = healthy.trace_rows()
    victim_device = max(sorted({r["device"] for r in rows}), key=lambda d: sum(r["device"] == d for r in rows))
    on_device = [r for r in rows if r["device"] == victim_device]
    # Kill the device in the middle of the shard it runs closest to half the makespan: the run is identical up to
    # then, so that shard is cut off.
    middle = healthy.makespan_s / 2
    victim = min(on_device, key=lambda r: abs((r["start_s"] + r["end_s"]) / 2 - middle))
    fail_at_s = (victim["start_s"] + victim["end_s"]) / 2

    instances, result = run(mixed_cluster, example_workflows, policy, fail_devices_at_s=((victim_device, fail_at_s),))
    rows = check_run(mixed_cluster, instances, result)
    assert result.controller.stats.retries >= 1
    assert victim["shard"] not in {r["shard"] for r in rows}
    for r in rows:
        if r["device"] == victim_device:
            assert r["start_s"] < fail_at_s and r["end_s"] <= fail_at_s, r["shard"]
    for w in instances:
        for sid, stage in result.controller.workflows[w.workflow_id].stages.items():
            assert len(stage.output_tokens) == stage.stage.num_requests, (w.workflow_id, sid)
