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
  drivers do; traced Python memory after 10% of them and after all, in total and without what `state.py`
  allocates (the belief's prefix caches: LRU sets that fill up to the engines' KV capacity, bounded by design, and
  reported as blocks held / capacity). The rest must stay flat (within 10%), not grow with history.
"""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
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


def memory_load(cluster: ClusterSpec, policy: str, n: int) -> dict:
    """Traced memory (MiB) of a planner after 10% and after 100% of `n` workflows have completed and been released."""
    estimator = CostEstimator(cluster, Calibration())
    timer = PlanTimer(make_policy(policy, PolicyContext(cluster, estimator)), keep_history=False)
    ctl = Controller(cluster, timer, estimator)
    base = example_workflows(cluster)
    marks: dict[int, tuple[float, float]] = {max(BATCH, n // 10): (0.0, 0.0), n: (0.0, 0.0)}
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
            if done_total in marks:
                gc.collect()
                stats = tracemalloc.take_snapshot().statistics("filename")
                total = sum(s.size for s in stats) / 2**20
                caches = sum(s.size for s in stats if s.traceback[0].filename.endswith("fate_ray/state.py")) / 2**20
                marks[done_total] = (total, total - caches)
    finally:
        tracemalloc.stop()
    (first, first_rest), (last, last_rest) = marks.values()
    caches = [c for dev in ctl.devices.values() for c in dev.state.caches.values()]
    return {"workflows": n, "memory_mib_at_10pct": first, "memory_mib_at_end": last,
            "memory_mib_without_caches_at_10pct": first_rest, "memory_mib_without_caches_at_end": last_rest,
            "growth_without_caches": last_rest / first_rest - 1 if first_rest else math.nan,
            "prefix_blocks_held": sum(len(c) for c in caches),
            "prefix_blocks_capacity": sum(c.capacity_blocks for c in caches),
            "kept_workflows": len(ctl.workflows)}


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
        m = row["memory"]
        console.print(f"{policy} memory after {m['workflows'] // 10:,} / {m['workflows']:,} workflows: "
                      f"{m['memory_mib_at_10pct']:.1f} / {m['memory_mib_at_end']:.1f} MiB; without the prefix-cache "
                      f"belief {m['memory_mib_without_caches_at_10pct']:.1f} / "
                      f"{m['memory_mib_without_caches_at_end']:.1f} MiB ({m['growth_without_caches']:+.1%}); "
                      f"prefix blocks held {m['prefix_blocks_held']:,} of {m['prefix_blocks_capacity']:,}; "
                      f"{m['kept_workflows']} workflows kept")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
