"""`fate-ray bench --suite load`: the planner under load, and whether it leaks or loses anything.

Three parts, each policy in turn:
- simulator: `sim_workflows` example workflows submitted at once to the default cluster (the simulator's engine
  model); simulated wall time, plan-round latency p50/p95, and lost (requests without an output) and duplicated
  (finishes the Controller had to drop) outputs, which must be 0;
- Ray: `ray_workflows` example workflows on an embedded Ray with SimEngine at 1e-4 wall seconds per modelled second
  (engine time almost vanishes): dispatch overhead p50/p95 (worker start - planner dispatch), shards/s, lost and
  duplicated outputs counted from the written records;
- memory: a planner (Controller + policy, as the planner actor holds them) taking `memory_workflows` workflows in
  batches, every shard finished at once (`drive.finish_everything`) and every finished workflow released as
  drivers do, in a fresh process of its own (so nothing of the other parts or policies is counted), run twice:
  once under tracemalloc for the traced Python memory, once untraced for the process's resident set size (RSS,
  what the Ray dashboard shows as the planner's memory; it includes the imported libraries). Both are taken
  after 10%, 50% and 100% of the workflows. The traced figure is split into the planner's belief of the
  engines' prefix caches (LRU sets bounded by the devices' KV capacity, so they grow until full and then stay,
  reported with blocks held / capacity) and the rest, which must not grow with history.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from rich.console import Console

from fate_ray.bench.drive import finish_everything
from fate_ray.bench.instances import example_workflows
from fate_ray.controller import Controller
from fate_ray.cost import Calibration, CostEstimator
from fate_ray.events import Dispatch, WorkflowReleased, WorkflowSubmitted
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import PlanTimer
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.simulator import SimConfig, percentile, simulate
from fate_ray.workload import Workflow

BATCH = 50


def examples(cluster: ClusterSpec, n: int) -> list[Workflow]:
    """`n` example workflows, cycling through the shipped ones, each with its own id."""
    base = example_workflows(cluster)
    return [base[i % len(base)].with_arrival(f"{base[i % len(base)].workflow_id}-{i}", 0.0) for i in range(n)]


def simulator_load(cluster: ClusterSpec, policy: str, n: int) -> dict:
    workflows = examples(cluster, n)
    res = simulate(cluster, workflows, policy, SimConfig(seed=0))
    ctl = res.controller
    expected = sum(st.num_requests for wf in workflows for st in wf.stages.values())
    outputs = ctl.status(tuple(ctl.workflows)).outputs
    recorded = sum(len(st.output_tokens) for stages in outputs.values() for st in stages.values())
    return {"workflows": n, "completed": len(res.completions_s), "sim_wall_s": res.wall_s,
            "plan_ms_p50": percentile(res.plan_ms, 50), "plan_ms_p95": percentile(res.plan_ms, 95),
            "events_per_s": res.events_per_s, "lost": expected - recorded,
            "duplicated": ctl.stats.duplicate_finishes}


def memory_marks(n: int) -> list[int]:
    """Completed workflows after which memory is measured: 10%, 50% and 100% of `n`, in whole batches."""
    return sorted({max(BATCH, round(n * f / BATCH) * BATCH) for f in (0.1, 0.5)} | {n})


def rss_mib() -> float:
    """This process's resident set size in MiB (Linux; NaN where /proc is missing)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return math.nan
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_run(cluster: ClusterSpec, policy: str, n: int, traced: bool) -> dict:
    """A planner taking `n` workflows in batches, each released once finished; at each of `memory_marks(n)`, its
    memory: traced (MiB, None unless `traced`), of which its prefix-cache belief, and the process's RSS (MiB)."""
    estimator = CostEstimator(cluster, Calibration())
    timer = PlanTimer(make_policy(policy, PolicyContext(cluster, estimator)), keep_history=False)
    ctl = Controller(cluster, timer, estimator)
    base = example_workflows(cluster)
    marks = memory_marks(n)
    rows: list[dict] = []
    if traced:
        tracemalloc.start()
    now_s, done_total = 0.0, 0
    try:
        while done_total < n:
            running: list[Dispatch] = []
            for i in range(BATCH):
                wf = base[i % len(base)].with_arrival(f"w{done_total + i}", now_s)
                running += [c for c in ctl.handle(WorkflowSubmitted(wf, now_s)) if isinstance(c, Dispatch)]
            done, _ = finish_everything(ctl, running, now_s + 1.0)
            now_s += 1.0 + len(done)
            for d in done:
                ctl.handle(WorkflowReleased(d.workflow_id, now_s))
            done_total += len(done)
            if len(rows) < len(marks) and done_total >= marks[len(rows)]:
                gc.collect()
                caches = [c for dev in ctl.devices.values() for c in dev.state.caches.values()]
                rows.append({"workflows": done_total,
                             "traced_mib": tracemalloc.get_traced_memory()[0] / 2**20 if traced else None,
                             "belief_mib": sum(c.footprint_bytes() for c in caches) / 2**20,
                             "rss_mib": rss_mib(),
                             "prefix_blocks_held": sum(len(c) for c in caches),
                             "prefix_blocks_capacity": sum(c.capacity_blocks for c in caches)})
    finally:
        if traced:
            tracemalloc.stop()
    return {"marks": rows, "kept_workflows": len(ctl.workflows)}


def memory_load(cluster: ClusterSpec, policy: str, n: int) -> dict:
    """The planner's memory after 10%, 50% and 100% of `n` workflows have completed and been released: traced
    (MiB) in total, of its prefix-cache belief and the rest, and the RSS of an untraced twin run; each run in a
    fresh process."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        traced, untraced = pool.map(partial(memory_run, cluster, policy, n), (True, False))
    rows = traced["marks"]
    for row, twin in zip(rows, untraced["marks"], strict=True):
        row["rest_mib"] = row["traced_mib"] - row["belief_mib"]
        row["rss_mib"] = twin["rss_mib"]  # tracemalloc's own tables would inflate the traced run's RSS

    def growth(key: str) -> float:
        return rows[-1][key] / rows[0][key] - 1 if rows[0][key] else math.nan

    return {"workflows": n, "marks": rows, "memory_mib_at_end": rows[-1]["traced_mib"],
            "growth_traced": growth("traced_mib"), "growth_without_caches": growth("rest_mib"),
            "growth_rss": growth("rss_mib"), "kept_workflows": traced["kept_workflows"]}


def memory_summary(policy: str, m: dict) -> str:
    """One line of `memory_load`'s figures, at each mark."""
    def figures(key: str, fmt: str = "{:.1f}") -> str:
        return " / ".join(fmt.format(mark[key]) for mark in m["marks"])

    return (f"{policy} planner memory after {figures('workflows', '{:,}')} workflows: traced {figures('traced_mib')} "
            f"MiB ({m['growth_traced']:+.1%}), of which the prefix-cache belief {figures('belief_mib')} MiB and the "
            f"rest {figures('rest_mib')} MiB ({m['growth_without_caches']:+.1%}); RSS {figures('rss_mib')} MiB "
            f"({m['growth_rss']:+.1%}); prefix blocks held {figures('prefix_blocks_held', '{:,}')} of "
            f"{m['marks'][-1]['prefix_blocks_capacity']:,}; {m['kept_workflows']} workflows kept")


def ray_load(cluster: ClusterSpec, policy: str, n: int, out_dir: Path) -> dict:
    from fate_ray.bench.runtime_bench import run_runtime_bench

    copies = math.ceil(n / len(example_workflows(cluster)))
    row = run_runtime_bench(cluster, [policy], out_dir, copies=copies, console=Console(quiet=True))["policies"][policy]
    return {k: row[k] for k in ("workflows", "shards", "failed", "dispatch_overhead_ms_p50",
                                "dispatch_overhead_ms_p95", "shards_per_s", "lost", "duplicated")}


def run_load(cluster: ClusterSpec, policies: list[str], out_dir: Path, console: Console, sim_workflows: int = 500,
             ray_workflows: int = 100, memory_workflows: int = 10_000, ray: bool = True) -> dict:
    results: dict = {"suite": "load", "cluster": cluster.name, "policies": {}}
    for policy in policies:
        row = results["policies"][policy] = {"simulator": simulator_load(cluster, policy, sim_workflows)}
        sim = row["simulator"]
        console.print(f"{policy} simulator: {sim['completed']}/{sim['workflows']} workflows at once, plan ms p50 "
                      f"{sim['plan_ms_p50']:.2f} p95 {sim['plan_ms_p95']:.2f}, {sim['events_per_s']:,.0f} events/s, "
                      f"lost {sim['lost']}, duplicated {sim['duplicated']}")
        if ray:
            row["ray"] = ray_load(cluster, policy, ray_workflows, out_dir / "ray")
            r = row["ray"]
            console.print(f"{policy} Ray: {r['shards']} shards of {r['workflows']} workflows, dispatch overhead p50 "
                          f"{r['dispatch_overhead_ms_p50']:.2f} ms p95 {r['dispatch_overhead_ms_p95']:.2f} ms, "
                          f"{r['shards_per_s']:.0f} shards/s, lost {r['lost']}, duplicated {r['duplicated']}")
        row["memory"] = memory_load(cluster, policy, memory_workflows)
        console.print(memory_summary(policy, row["memory"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
