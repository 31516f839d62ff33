"""`fate-ray bench --suite vllm`: policies side by side on real vLLM engines (CPU, tiny local models).

Each policy gets fresh actors (every engine starts cold) and the same workflows: `support_answers` repeated, whose
requests share a long help-centre prefix and continue each other's conversations, so where a request runs decides
what vLLM's prefix cache serves. Reported per policy, from one run each: wall time (and its ratio to the first
policy's), vLLM's prefix hit rate (`num_cached_tokens` / prompt tokens), model loads, how far the planner's
predicted cached tokens were from vLLM's, and the estimator's calibration per phase (median |log(measured /
estimated)| of the formula alone and of the calibrated estimates).
NOTE: one run per policy on a 2-core machine: wall times move by several percent between runs; the hit rates and
loads are the robust figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from fate_ray.bench.instances import examples_dir
from fate_ray.engines.tiny_models import build_all
from fate_ray.engines.tokens import load_workflows
from fate_ray.runtime.driver import RunConfig, connect, run_workflows
from fate_ray.runtime.service import ServiceConfig, start_actors
from fate_ray.schema.cluster import ClusterSpec

WORKFLOW = "support_answers.yaml"


def run_vllm_bench(cluster: ClusterSpec, policies: list[str], out_dir: Path, copies: int = 4,
                   console: Console | None = None) -> dict:
    console = console or Console()
    build_all()
    workflow = load_workflows([examples_dir() / WORKFLOW], cluster, "vllm")[0]
    connect(cluster)
    results: dict = {"suite": "vllm", "cluster": cluster.name, "workflow": WORKFLOW, "copies": copies,
                     "policies": {}}
    for k, policy in enumerate(policies):
        planner, workers = start_actors(cluster, ServiceConfig(policy=policy, engine="vllm"),
                                        name_suffix=f"-vllm-bench{k}")
        try:
            started = time.perf_counter()
            summary = run_workflows([workflow] * copies, RunConfig(out_dir=out_dir / policy, timeout_s=1800), planner)
            wall_s = time.perf_counter() - started
        finally:
            for handle in [planner, *workers.values()]:
                ray.kill(handle)
        stats, prefix = summary["stats"], summary["prefix"]
        results["policies"][policy] = {
            "wall_s": round(wall_s, 1), "failed": len(summary["failed"]), "prefix": prefix,
            "model_loads": stats["model_events"]["load"], "calibration": stats["calibration"]}
        console.print(f"{policy}: {wall_s:.1f} s wall, prefix hit rate {prefix['hit_rate']:.1%}, "
                      f"{stats['model_events']['load']} model loads")
    _show(results, console)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _show(results: dict, console: Console) -> None:
    rows = results["policies"]
    base = next(iter(rows.values()))["wall_s"]
    table = Table(title=f"{results['copies']} x {results['workflow']} on real vLLM ({results['cluster']})")
    for col in ("policy", "wall s", "vs first", "prefix hit rate", "predicted hits", "median |drift|",
                "max |drift|", "model loads"):
        table.add_column(col)
    for policy, r in rows.items():
        p = r["prefix"]
        table.add_row(policy, f"{r['wall_s']:.1f}", f"{r['wall_s'] / base:.3f}", f"{p['hit_rate']:.1%}",
                      f"{p['predicted_cached_tokens'] / max(1, p['prompt_tokens']):.1%}",
                      str(p["drift_tokens_median"]), str(p["drift_tokens_max"]), str(r["model_loads"]))
    console.print(table)
    cal = Table(title="estimator calibration: median |log(measured / estimated)| per phase")
    for col in ("policy", "phase", "observations", "formula alone", "calibrated"):
        cal.add_column(col)
    for policy, r in rows.items():
        for phase, c in r["calibration"].items():
            cal.add_row(policy, phase, str(c["observations"]), f"{c['uncalibrated']:.3f}", f"{c['calibrated']:.3f}")
    console.print(cal)
