"""`fate-ray bench --suite runtime`: the Ray runtime's own overhead, with SimEngine workers at near-zero time scale.

dispatch overhead = worker's shard start (wall) - planner's dispatch (wall, taken after the planning round
returned, so solver time is excluded): the cost of the `.remote()` hop and the worker's event loop.
throughput = shards finished / (last shard end - first dispatch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from rich.console import Console

from fate_ray.bench.instances import example_workflows
from fate_ray.runtime.driver import RunConfig, connect, read_requests, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.simulator import percentile

TIME_SCALE = 1e-4  # 10,000 modelled seconds per wall second: engine time almost vanishes


def run_runtime_bench(cluster: ClusterSpec, policies: list[str], out_dir: Path, copies: int = 4,
                      console: Console | None = None) -> dict:
    console = console or Console()
    connect(cluster)
    results: dict = {"suite": "runtime", "devices": len(cluster.devices), "time_scale": TIME_SCALE, "policies": {}}
    for k, policy in enumerate(policies):
        cfg = RunConfig(out_dir=out_dir / policy)
        planner, workers = start_actors(cluster, ServiceConfig(policy=policy, time_scale=TIME_SCALE),
                                        name_suffix=f"-bench{k}")
        workflows = example_workflows(cluster) * copies
        started = time.perf_counter()
        summary = run_workflows(workflows, cfg, planner)
        wall_s = time.perf_counter() - started
        rows = [row for wf in summary["workflows"] for row in read_requests(cfg.out_dir, wf["name"])]
        shards = {row["shard"]: row for row in rows}.values()
        keys = [(row["workflow"], row["stage"], row["request"]) for row in rows]
        expected = sum(st.num_requests for wf in workflows for st in wf.stages.values())
        overhead_ms = [(s["start_s"] - s["dispatched_s"]) * 1000 for s in shards]
        span_s = max(s["end_s"] for s in shards) - min(s["dispatched_s"] for s in shards)
        row = {"workflows": len(workflows), "shards": len(shards), "failed": len(summary["failed"]),
               "dispatch_overhead_ms_p50": percentile(overhead_ms, 50),
               "dispatch_overhead_ms_p95": percentile(overhead_ms, 95),
               "shards_per_s": len(shards) / span_s if span_s > 0 else 0.0, "wall_s": wall_s,
               "lost": expected - len(set(keys)), "duplicated": len(keys) - len(set(keys))}
        results["policies"][policy] = row
        console.print(f"{policy}: {row['shards']} shards of {row['workflows']} workflows on {len(workers)} workers: "
                      f"dispatch overhead p50 {row['dispatch_overhead_ms_p50']:.2f} ms, "
                      f"p95 {row['dispatch_overhead_ms_p95']:.2f} ms; {row['shards_per_s']:.0f} shards/s")
        for handle in [planner, *workers.values()]:
            ray.kill(handle)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
