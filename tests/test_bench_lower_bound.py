"""The lower bound is one: for every policy, on the shipped examples and a real-DAG sample, cold and warm, no run
finishes faster than the bound computed from that run's own draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from fate_ray.bench.lower_bound import run_lower_bound_s
from fate_ray.cost import CostEstimator
from fate_ray.policies import BASELINES
from fate_ray.sim.arrivals import arrivals
from fate_ray.sim.simulator import SimConfig, simulate

REALDAGS = Path(__file__).resolve().parents[2] / "shared" / "realdags"
POLICIES = (*BASELINES, "fate")


def warm(cluster) -> tuple:
    """The smallest catalog model on every device."""
    small = min(cluster.models, key=lambda m: cluster.models[m].footprint_gib)
    return tuple((d.device_id, (small,)) for d in cluster.devices)


def check(cluster, workflows, seed: int, initial_models: tuple = ()) -> list[float]:
    timed = arrivals(workflows, "poisson", CostEstimator(cluster), seed)
    config = SimConfig(seed=seed, initial_models=initial_models)
    lb = run_lower_bound_s(timed, cluster, config)
    ratios = []
    for policy in POLICIES:
        result = simulate(cluster, timed, policy, config)
        assert not result.failed
        assert lb <= result.makespan_s, (policy, seed, lb, result.makespan_s)
        ratios.append(result.makespan_s / lb)
    return ratios


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("regime", ["cold", "warm"])
def test_no_run_of_the_examples_beats_the_bound(mixed_cluster, example_workflows, seed, regime):
    ratios = check(mixed_cluster, list(example_workflows) * 2, seed, warm(mixed_cluster) if regime == "warm" else ())
    assert min(ratios) < 20  # a bound, but not a vacuous one


@pytest.mark.slow
def test_no_run_of_a_real_dag_sample_beats_the_bound(mixed_cluster):
    if not REALDAGS.is_dir():
        pytest.skip(f"real traces not present at {REALDAGS}")
    from fate_ray.traces import load_dags
    from fate_ray.traces.common import catalog_models_of

    catalog = catalog_models_of(mixed_cluster)
    genome = load_dags([REALDAGS / "wfcommons" / "pegasus" / "1000genome"], 0, catalog)
    jobs = load_dags([REALDAGS / "alibaba_v2018"], 0, catalog)[:8]
    for workflows in (genome * 4, jobs):
        for regime in ((), warm(mixed_cluster)):
            check(mixed_cluster, workflows, 0, regime)
