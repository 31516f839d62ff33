"""Run every policy on the same instances and seeds, in parallel processes, and aggregate the paper's metrics.

Each job is one (instance, seed, policy) simulation. Every policy of a (instance, seed) pair sees the same arrival
times and output lengths (the engine model draws them from (seed, what runs)). Normalised figures divide by
RoundRobin on the same instance and seed and aggregate with the geometric mean, with bootstrap intervals, ratios
and win rates against the suite's best baseline (bench/stats.py, docs/benchmarking.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from fate_ray.bench.instances import Instance
from fate_ray.bench.lower_bound import run_lower_bounds
from fate_ray.bench.stats import best_baseline, bootstrap_ci, geomean, ratios_to, versus
from fate_ray.cost import CostEstimator
from fate_ray.policies.registry import BASELINES
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.simulator import SimConfig, percentile, simulate

NORMALISER = "round_robin"


@dataclass(frozen=True)
class Job:
    instance: int
    seed: int
    policy: str


@dataclass
class JobResult:
    row: dict
    plan_ms: list[float]
    trace: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    solver_status: dict[str, int] = field(default_factory=dict)
    estimator_error: float = 0.0
    estimator_error_uncalibrated: float = 0.0


_STATE: dict = {}


def _init(cluster: ClusterSpec, instances: Sequence[Instance], trace: bool, sim_options: dict | None = None) -> None:
    _STATE.update(cluster=cluster, instances=instances, trace=trace, sim_options=dict(sim_options or {}))


def run_job(job: Job) -> JobResult:
    cluster: ClusterSpec = _STATE["cluster"]
    inst: Instance = _STATE["instances"][job.instance]
    estimator = CostEstimator(cluster)
    workflows = inst.realise(job.seed, estimator)
    config = SimConfig(seed=job.seed, initial_models=inst.initial_models, **_STATE.get("sim_options", {}))
    res = simulate(cluster, workflows, job.policy, config, record_trace=_STATE["trace"])
    bounds = run_lower_bounds(workflows, cluster, config)
    row = {
        "instance": inst.name, "group": inst.group, "regime": inst.regime, "seed": job.seed, "policy": job.policy,
        "workflows": len(workflows), "completed": len(res.completions_s), "failed": len(res.failed),
        "makespan_s": res.makespan_s, "p95_s": res.p95_s, "lb_s": bounds.makespan_s,
        "p95_lb_s": bounds.p95_s(res.completions_s),
        "prefix_hit_rate": res.prefix_hit_rate, "model_loads": res.loads, "model_wakes": res.wakes,
        "events": res.events, "sim_wall_s": res.wall_s, "sim_controller_s": res.controller_s,
        "sim_plan_s": sum(res.plan_ms) / 1000,
        "plan_ms_p95": percentile(res.plan_ms, 95),
    }
    trace = res.trace_rows(inst.name) if _STATE["trace"] else []
    ctrl = res.controller
    cal = ctrl.estimator.calibration
    return JobResult(row, res.plan_ms, trace, res.prompt_tokens, res.cached_tokens, dict(ctrl.stats.solver_status),
                     cal.median_abs_log_error(), cal.median_abs_log_error(uncalibrated=True))


def run_jobs(cluster: ClusterSpec, instances: Sequence[Instance], policies: Sequence[str], seeds: Sequence[int],
             trace: bool = False, jobs: int | None = None,
             on_done: Callable[[JobResult], None] | None = None, sim_options: dict | None = None) -> list[JobResult]:
    """`sim_options`: SimConfig settings every job shares (the Controller's queue_order and prefetch)."""
    todo = [Job(i, s, p) for i in range(len(instances)) for s in seeds for p in policies]
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    results: list[JobResult] = []
    if workers == 1:
        _init(cluster, instances, trace, sim_options)
        for job in todo:
            results.append(run_job(job))
            if on_done:
                on_done(results[-1])
        return results
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(cluster, instances, trace, sim_options)) as pool:
        for fut in as_completed([pool.submit(run_job, j) for j in todo]):
            results.append(fut.result())
            if on_done:
                on_done(results[-1])
    return results


def aggregate(results: Sequence[JobResult], policies: Sequence[str], baselines: Sequence[str] = BASELINES) -> dict:
    """The results.json `policies`, `by_group` and `by_regime` mappings and `best_baseline` (see bench/stats.py)."""
    rows = [r.row for r in results]
    # Only complete runs are compared: a partial one would compare a different workload (or divide by 0).
    complete = [r for r in rows if r["completed"] == r["workflows"]]
    base = {(r["instance"], r["seed"]): r for r in complete if r["policy"] == NORMALISER}
    overall = {p: _summarise([r for r in results if r.row["policy"] == p], base) for p in policies}
    best = best_baseline(overall, [b for b in baselines if b in policies])
    reference = {(r["instance"], r["seed"]): r for r in complete if r["policy"] == best}

    def with_versus(summary: dict, mine: Sequence[JobResult]) -> dict:
        if best is not None:
            summary.update(versus([r.row for r in mine if r.row["completed"] == r.row["workflows"]], reference))
        return summary

    def section(keep: Callable[[dict], bool]) -> dict:
        out = {}
        for p in policies:
            mine = [r for r in results if r.row["policy"] == p and keep(r.row)]
            out[p] = with_versus(_summarise(mine, base), mine)
        return out

    groups = sorted({r["group"] for r in rows if r["group"]})
    regimes = sorted({r.get("regime", "") for r in rows} - {""})
    return {"policies": {p: with_versus(overall[p], [r for r in results if r.row["policy"] == p]) for p in policies},
            "by_group": {g: section(lambda r, g=g: r["group"] == g) for g in groups},
            "by_regime": {g: section(lambda r, g=g: r.get("regime") == g) for g in regimes},
            "best_baseline": best}


def _summarise(results: Sequence[JobResult], base: dict) -> dict:
    rows = [r.row for r in results]
    ok = [r for r in rows if (r["instance"], r["seed"]) in base and r["completed"] == r["workflows"]]
    makespan = ratios_to(ok, base, "makespan_s")
    p95 = ratios_to(ok, base, "p95_s")
    prompt = sum(r.prompt_tokens for r in results)
    plan_ms = [ms for r in results for ms in r.plan_ms]
    status: dict[str, int] = {}
    for r in results:
        for k, v in r.solver_status.items():
            status[k] = status.get(k, 0) + v
    return {
        "normalized_makespan": geomean(makespan),
        "normalized_makespan_ci95": bootstrap_ci(makespan),
        "normalized_p95": geomean(p95),
        "normalized_p95_ci95": bootstrap_ci(p95),
        "makespan_s": _mean([r["makespan_s"] for r in rows]),
        "p95_s": _mean([r["p95_s"] for r in rows]),
        "lb_ratio": geomean([r["makespan_s"] / r["lb_s"] for r in rows if r["lb_s"] > 0]),
        "p95_lb_ratio": geomean([r["p95_s"] / r["p95_lb_s"] for r in rows if r["p95_lb_s"] > 0]),
        "prefix_hit_rate": sum(r.cached_tokens for r in results) / prompt if prompt else 0.0,
        "model_loads": _mean([r["model_loads"] for r in rows]),
        "model_wakes": _mean([r["model_wakes"] for r in rows]),
        "plan_ms_p50": percentile(plan_ms, 50),
        "plan_ms_p95": percentile(plan_ms, 95),
        "failed_workflows": sum(r["failed"] for r in rows),
        "solver_status": status,
        "estimator_median_abs_log_error": _mean([r.estimator_error for r in results]),
        "estimator_median_abs_log_error_uncalibrated": _mean([r.estimator_error_uncalibrated for r in results]),
        "runs": len(rows),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def throughput(results: Sequence[JobResult]) -> float:
    """Simulator shard events handled per second of simulation wall time, over all runs."""
    events = sum(r.row["events"] for r in results)
    wall = sum(r.row["sim_wall_s"] for r in results)
    return events / wall if wall > 0 else 0.0


def time_per_event(results: Sequence[JobResult]) -> dict[str, float]:
    """Where the simulator's time goes, in microseconds per shard event over all runs: the Controller (its own
    bookkeeping), the policy's planning rounds, and the engine models with the event loop."""
    events = sum(r.row["events"] for r in results)
    if not events:
        return {"controller_us": 0.0, "policy_us": 0.0, "engine_us": 0.0}
    wall = sum(r.row["sim_wall_s"] for r in results)
    inside = sum(r.row["sim_controller_s"] for r in results)
    plan = sum(r.row["sim_plan_s"] for r in results)
    return {"controller_us": (inside - plan) / events * 1e6, "policy_us": plan / events * 1e6,
            "engine_us": (wall - inside) / events * 1e6}
