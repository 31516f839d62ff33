"""`fate-ray bench --suite planner-scale`: planning latency and solver statuses as the frontier grows.

Each size (stages x devices) is a synthetic round: a cluster of `devices` devices, half H100-80G and half L4-24G
(the default cluster's types and catalog), split into nodes of 8; a frontier of `stages` ready stages from a few
workflows, with seeded models (larger ones rarer), request counts (1..16) and prompt sizes; devices with seeded
resident models and backlogs. The policy plans the same round `rounds` times; we report wall-time p50/p95 of
`plan()`, the solver statuses and how many rounds CP-SAT ended on its wall-clock limit rather than its
deterministic one (those plans would differ on a faster machine; FATE's only). Nothing is timed in tests: this is
the benchmark.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import MappingProxyType

from rich.console import Console
from rich.table import Table

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import ReadyStage
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec, DeviceGroup, Node
from fate_ray.sim.simulator import percentile
from fate_ray.state import ClusterSnapshot, DeviceSnapshot
from fate_ray.workload import Stage, TextPart, stable_key

SIZES = ((16, 8), (64, 16), (256, 64), (1024, 256))


def scaled_cluster(base: ClusterSpec, devices: int) -> ClusterSpec:
    types = sorted(base.device_types, key=lambda t: -base.device_types[t].memory_gib)
    nodes = []
    for n in range(max(1, devices // 8)):
        kind = types[n % len(types)]
        nodes.append(Node(name=f"n{n}", devices=[DeviceGroup(type=kind, count=min(8, devices - 8 * n))]))
    return base.model_copy(update={"nodes": nodes, "name": f"scaled-{devices}"})


def synthetic_round(cluster: ClusterSpec, stages: int, seed: int) -> tuple[ClusterSnapshot, list[ReadyStage]]:
    rng = random.Random(stable_key("planner-scale", stages, len(cluster.devices), seed))
    models = sorted(cluster.models, key=lambda m: cluster.models[m].params_b)
    weights = [cluster.models[m].params_b ** -0.75 for m in models]
    block = cluster.block_tokens
    frontier = []
    for k in range(stages):
        model = rng.choices(models, weights)[0]
        n = rng.randint(1, 16)
        sysprompt = TextPart(stable_key("sys", k % 7), rng.randint(256, 2048))
        prompts = tuple((sysprompt, TextPart(stable_key("own", k, i), rng.randint(128, 2048))) for i in range(n))
        out = rng.randint(32, 512)
        st = Stage(f"s{k}", model, (), n, prompts, out, 2 * out)
        dag = DagInfo({st.stage_id: st}, {st.stage_id: ()}, {st.stage_id: [sum(p.tokens for p in q) for q in prompts]},
                      {st.stage_id: rng.uniform(1, 60)})
        reqs = tuple(RequestShape(sum(p.tokens for p in q), tuple(range(k * 1000, k * 1000 + q[0].tokens // block)), out)
                     for q in prompts)
        frontier.append(ReadyStage((f"w{k % 13}", st.stage_id), model, tuple(range(n)), reqs, n > 1,
                                   dag.ranks_s[st.stage_id], 0.0, {}, dag))
    devices = []
    for d in cluster.devices:
        fitting = [m for m in models if cluster.fits(m, d.type)]
        resident = {rng.choice(fitting): "ACTIVE"}
        dtype = cluster.device_types[d.type]
        devices.append(DeviceSnapshot(d, dtype.memory_gib, dtype.concurrency, True, MappingProxyType(resident),
                                      MappingProxyType({}), frozenset(), rng.uniform(0, 30), 0, 0))
    return ClusterSnapshot(0.0, tuple(devices)), frontier


def run_planner_scale(base: ClusterSpec, policies: list[str], out_dir: Path, rounds: int = 10,
                      console: Console | None = None, sizes: tuple[tuple[int, int], ...] = SIZES) -> dict:
    console = console or Console()
    results: dict = {"suite": "planner-scale", "sizes": {}}
    table = Table(title="planner-scale: plan() wall time per round", title_justify="left")
    smallest = f"{sizes[0][0]}x{sizes[0][1]}"
    # The ratio to the smallest size does not depend on how fast the machine is; the milliseconds do.
    for col in ("policy", "stages x devices", "p50 ms", "p95 ms", f"p95 / {smallest}", "wall-limited", "statuses"):
        table.add_column(col, justify="right" if "ms" in col or "/" in col else "left")
    first_p95: dict[str, float] = {}
    for stages, devices in sizes:
        cluster = scaled_cluster(base, devices)
        n_rounds = rounds if stages <= 256 else max(2, rounds // 4)
        for name in policies:
            policy = make_policy(name, PolicyContext(cluster, CostEstimator(cluster), 0))
            times, statuses = [], {}
            for r in range(n_rounds):
                snapshot, frontier = synthetic_round(cluster, stages, r)
                started = time.perf_counter()
                plan = policy.plan(snapshot, frontier)
                times.append((time.perf_counter() - started) * 1000)
                statuses[plan.solver_status or "-"] = statuses.get(plan.solver_status or "-", 0) + 1
            key = f"{stages}x{devices}"
            p50, p95 = percentile(times, 50), percentile(times, 95)
            first = first_p95.setdefault(name, p95)
            ratio = p95 / first if first > 0 else float("nan")
            wall_limited = getattr(policy, "wall_limited_rounds", 0)
            results["sizes"].setdefault(key, {})[name] = {
                "plan_ms_p50": p50, "plan_ms_p95": p95, f"p95_over_{smallest}": ratio,
                "solver_status": statuses, "rounds": n_rounds, "wall_limited_rounds": wall_limited}
            table.add_row(name, key, f"{p50:.1f}", f"{p95:.1f}", f"{ratio:.1f}", f"{wall_limited}/{n_rounds}",
                          ", ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
