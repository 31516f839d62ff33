"""`fate-ray bench`: suites, lower bounds, normalisation, tables and plots."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fate_ray.bench.instances import WORKFLOWS_PER_INSTANCE, suite_instances
from fate_ray.bench.report import print_report, write_outputs
from fate_ray.bench.runner import NORMALISER, aggregate, run_jobs, throughput, time_per_event
from fate_ray.policies.registry import BASELINES
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.simulator import SimConfig


def run_suite(suite: str, cluster: ClusterSpec, policies: Sequence[str], seeds: int, out_dir: Path,
              dags: Sequence[str] = (), trace: bool = False, jobs: int | None = None,
              console: Console | None = None, workflows_per_instance: int = WORKFLOWS_PER_INSTANCE,
              sim_options: dict | None = None) -> dict:
    """Run a suite (every instance cold and warm), print its tables, write results.json/csv/md/summary.png (and
    trace.jsonl); return the results."""
    console = console or Console()
    SimConfig(**(sim_options or {}))  # a bad setting fails here, before any job starts
    policies = list(dict.fromkeys([NORMALISER, *policies]))
    instances = suite_instances(suite, cluster, dags, workflows_per_instance)
    seed_list = list(range(seeds))
    total = len(instances) * len(seed_list) * len(policies)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"bench {suite}", total=total)
        job_results = run_jobs(cluster, instances, policies, seed_list, trace=trace, jobs=jobs,
                               on_done=lambda _: progress.advance(task), sim_options=sim_options)
    wall_s = time.perf_counter() - started
    baseline_runs = [r for r in job_results if r.row["policy"] in BASELINES]  # the speed goal is set with these
    job_results.sort(key=lambda r: (r.row["instance"], r.row["seed"], policies.index(r.row["policy"])))
    results = {
        "suite": suite,
        "cluster": cluster.name,
        "seeds": seed_list,
        "instances": [i.name for i in instances],
        "workflows_per_instance": workflows_per_instance,
        "sim_options": dict(sim_options or {}),  # Controller settings every policy shared (defaults when empty)
        **aggregate(job_results, policies),
        "per_instance": [r.row for r in job_results],
        "wall_s": wall_s,
        "sim_events_per_s": throughput(job_results),
        "sim_events_per_s_baselines": throughput(baseline_runs),
        "sim_us_per_event_baselines": time_per_event(baseline_runs),
    }
    print_report(console, results)
    shown = "fate" if "fate" in policies else policies[0]
    err = results["policies"][shown]
    console.print(f"estimator median |log(measured/estimated)| per phase ({shown}): "
                  f"{err['estimator_median_abs_log_error_uncalibrated']:.3f} uncalibrated, "
                  f"{err['estimator_median_abs_log_error']:.3f} with online calibration")
    split = results["sim_us_per_event_baselines"]
    console.print(f"simulator: {results['sim_events_per_s']:,.0f} shard events/s, "
                  f"{results['sim_events_per_s_baselines']:,.0f} with the baselines (per event: "
                  f"{split['controller_us']:.0f} us Controller, {split['policy_us']:.0f} us policy, "
                  f"{split['engine_us']:.0f} us engine models); wall time {wall_s:.1f} s; results in {out_dir}/")
    write_outputs(out_dir, results, job_results, trace)
    return results
