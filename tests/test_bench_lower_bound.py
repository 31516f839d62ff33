"""The lower bounds are bounds: for every policy, on the shipped examples and a real-DAG sample, cold and warm, no
run finishes faster, and no run's P95 latency is lower, than the bounds computed from that run's own draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from fate_ray.bench.lower_bound import run_lower_bounds
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


def check(cluster, workflows, seed: int, initial_models: tuple = ()) -> list[tuple[float, float]]:
    """(makespan / its bound, P95 / its bound) of every policy's run."""
    timed = arrivals(workflows, "poisson", CostEstimator(cluster), seed)
    config = SimConfig(seed=seed, initial_models=initial_models)
    bounds = run_lower_bounds(timed, cluster, config)
    ratios = []
    for policy in POLICIES:
        result = simulate(cluster, timed, policy, config)
        assert not result.failed
        assert bounds.makespan_s <= result.makespan_s, (policy, seed, bounds.makespan_s, result.makespan_s)
        late = {w: (bound_s, result.completions_s[w] - result.arrivals_s[w])
                for w, bound_s in bounds.latency_bounds_s.items()
                if result.completions_s[w] - result.arrivals_s[w] < bound_s}
        assert not late, (policy, seed, late)  # each workflow's own bound, hence the P95 one
        p95_bound_s = bounds.p95_s(result.completions_s)
        assert p95_bound_s <= result.p95_s, (policy, seed, p95_bound_s, result.p95_s)
        ratios.append((result.makespan_s / bounds.makespan_s, result.p95_s / p95_bound_s))
    return ratios


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("regime", ["cold", "warm"])
def test_no_run_of_the_examples_beats_the_bound(mixed_cluster, example_workflows, seed, regime):
    ratios = check(mixed_cluster, list(example_workflows) * 2, seed, warm(mixed_cluster) if regime == "warm" else ())
    assert min(m for m, _ in ratios) < 20  # bounds, but not vacuous ones
    assert min(p for _, p in ratios) < 20


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
