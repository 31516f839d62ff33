"""`fate-ray`: validate workflow YAML, simulate it, benchmark policies.

User errors (bad YAML, unknown names, missing files) print one line per problem and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from fate_ray.schema.cluster import ClusterSpec, default_cluster_path, load_cluster
from fate_ray.schema.errors import InputError, Problem

EXIT_USAGE = 2
WORKFLOWS_PER_INSTANCE = 50  # = fate_ray.bench.instances.WORKFLOWS_PER_INSTANCE (not imported: keeps startup light)
# = fate_ray.controller.QUEUE_ORDERS, default first (DEFAULT_QUEUE_ORDER); not imported, as above (a test checks)
QUEUE_ORDERS = ("arrival", "rank", "fifo")


def make_console() -> Console:
    # Tables are wide; when output goes to a file or CI log, do not squeeze them into 80 columns.
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _cluster(path: str | None) -> ClusterSpec:
    p = Path(path) if path else default_cluster_path()
    if not p.exists():
        raise InputError([Problem(str(p), 1, "cluster file not found; pass --cluster FILE")])
    return load_cluster(p)


def cmd_validate(args) -> int:
    from fate_ray.schema.workflow import load_workflow

    cluster = _cluster(args.cluster)
    problems: list[str] = []
    for f in args.files:
        try:
            _, wf = load_workflow(f, cluster)
        except InputError as exc:
            problems += [str(p) for p in exc.problems]
            continue
        requests = sum(s.num_requests for s in wf.stages.values())
        print(f"ok: {f}: {len(wf.stages)} stages, {requests} requests, models {', '.join(sorted(wf.models))}")
    for line in problems:
        print(line, file=sys.stderr)
    return EXIT_USAGE if problems else 0


def cmd_simulate(args) -> int:
    from fate_ray.cost import CostEstimator
    from fate_ray.policies import check_policy_names
    from fate_ray.schema.workflow import load_workflow
    from fate_ray.sim.arrivals import arrivals
    from fate_ray.sim.simulator import SimConfig, simulate

    cluster = _cluster(args.cluster)
    check_policy_names([args.policy])
    workflows = [load_workflow(f, cluster)[1] for f in args.files] * args.copies
    instances = arrivals(workflows, args.arrival, CostEstimator(cluster), args.seed, args.utilisation)
    config = SimConfig(seed=args.seed, **controller_options(args))
    res = simulate(cluster, instances, args.policy, config, record_trace=bool(args.trace))
    print(f"policy {args.policy}, seed {args.seed}, {len(instances)} workflows on {cluster.name}, queue order "
          f"{config.queue_order}, prefetch {'on' if config.prefetch else 'off'}")
    print(f"makespan {res.makespan_s:.1f} s, P95 latency {res.p95_s:.1f} s, prefix hits "
          f"{res.cached_tokens:,}/{res.prompt_tokens:,} tokens ({res.prefix_hit_rate:.0%}), model loads {res.loads}, "
          f"wakes {res.wakes}, failed {len(res.failed)}")
    for wid, why in res.failed.items():
        print(f"failed: {wid}: {why}")
    if args.trace:
        with open(args.trace, "w") as fh:
            for row in res.trace_rows("cli"):
                fh.write(json.dumps(row) + "\n")
    return 1 if res.failed else 0


def cmd_bench(args) -> int:
    from fate_ray.bench import run_suite
    from fate_ray.policies import BASELINES, check_policy_names

    cluster = _cluster(args.cluster)
    policies = args.policies.split(",") if args.policies else ["fate", *BASELINES]
    check_policy_names(policies)
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    out = Path(args.out or f"results/{args.suite}")
    if args.suite == "runtime":
        from fate_ray.bench.runtime_bench import run_runtime_bench

        chosen = args.policies.split(",") if args.policies else ["fate", "round_robin"]
        run_runtime_bench(cluster, chosen, out, console=make_console())
        return 0
    if args.suite == "planner-scale":
        from fate_ray.bench.planner_scale import run_planner_scale

        chosen = args.policies.split(",") if args.policies else ["fate", "fate-greedy", "heft"]
        run_planner_scale(cluster, chosen, out, console=make_console())
        return 0
    run_suite(args.suite, cluster, policies, args.seeds, out, args.dags or (), args.trace, args.jobs,
              console=make_console(), workflows_per_instance=args.workflows_per_instance,
              sim_options={**controller_options(args), "truth_perturb": args.truth_perturb})
    return 0


def cmd_run(args) -> int:
    from fate_ray.policies import check_policy_names
    from fate_ray.schema.workflow import load_workflow

    cluster = _cluster(args.cluster)
    check_policy_names([args.policy])
    workflows = [load_workflow(f, cluster)[1] for f in args.files]  # validate everything before touching Ray
    from fate_ray.runtime.driver import RunConfig, connect, run_workflows

    console = make_console()
    cfg = RunConfig(policy=args.policy, engine=args.engine, time_scale=args.time_scale, out_dir=Path(args.out),
                    timeout_s=args.timeout, **controller_options(args))
    connect(cluster)
    last: dict[str, str] = {}

    def show(progress):
        for p in progress:
            line = f"{p['workflow']}: {p['stages_done']}/{p['stages']} stages, {p['running_shards']} running, {p['state']}"
            if last.get(p["workflow"]) != line:
                console.print(line)
                last[p["workflow"]] = line

    summary = run_workflows(cluster, workflows, cfg, on_progress=show)
    for p in summary["workflows"]:
        if p["state"] == "failed":
            console.print(f"failed: {p['workflow']}: {p.get('error', '')}")
    console.print(f"outputs in {cfg.out_dir}/ ({len(summary['workflows'])} workflows, "
                  f"{len(summary['failed'])} not done)")
    return 1 if summary["failed"] else 0


def cmd_demo(args) -> int:
    """The main job: a local Ray head on loopback, `ray job submit` of example workflows, their summary."""
    from fate_ray.runtime.job import actor_names, submit_run
    from fate_ray.runtime.local_head import start_local_head

    console = make_console()
    cluster_path = default_cluster_path()
    cluster = _cluster(str(cluster_path))
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out).resolve()
    files = [f"workflows/{name}.yaml" for name in ("rag_rerank", "mapreduce_summary", "multiturn_chain")]
    console.print(f"[bold]fate-ray demo[/]: starting a local Ray head (loopback, {len(cluster.devices)} fake GPUs "
                  f"for cluster {cluster.name!r})")
    head = start_local_head(num_gpus=len(cluster.devices))
    try:
        console.print(f"dashboard {head.dashboard_url}   metrics {head.metrics_url}   temp dir {head.temp_dir}")
        console.print(f"ray job submit --address {head.dashboard_url} --working-dir . -- "
                      f"python -m fate_ray.cli run {' '.join(files)} --policy {args.policy} --out {out}")
        proc = submit_run(head, root, [*files, "--cluster", str(cluster_path), "--policy", args.policy,
                                       "--out", str(out)])
        for line in proc.stdout.splitlines():
            if ": " in line and ("stages" in line or line.startswith(("outputs", "failed"))):
                console.print("  job> " + line)
        named = actor_names(head)
        console.print(f"actors on the dashboard: {', '.join(sorted(n for n in named if n.startswith('fate-')))}")
        if proc.returncode != 0:
            console.print(f"[red]the job failed[/] (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            return 1
        summary = json.loads((out / "summary.json").read_text())
        for wf in summary["workflows"]:
            console.print(f"{wf['workflow']}: {wf['state']} in {wf.get('latency_s', 0):.1f} s wall, "
                          f"{wf['stages']} stages")
        console.print(f"planner: {summary['stats']}")
        console.print(f"outputs: {out}/<workflow>.jsonl, {out}/summary.json")
    finally:
        head.stop()
        console.print("local Ray head stopped")
    return 0


def controller_options(args) -> dict:
    """The Controller settings every policy of a run shares, as SimConfig keywords."""
    return {"queue_order": args.queue_order, "prefetch": not args.no_prefetch}


def add_controller_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue-order", choices=QUEUE_ORDERS, default=QUEUE_ORDERS[0],
                   help="how every device orders its queue, for every policy: arrival = oldest workflow first, then "
                   "upward rank; rank = upward rank first; fifo = placement order (default %(default)s)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="switch off the Controller's generic prefetch of the next stages' models (every policy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fate-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check workflow YAML files against a cluster's model catalog")
    p.add_argument("files", nargs="+")
    p.add_argument("--cluster", help="cluster YAML (default: the mixed H100/L4 cluster)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("simulate", help="simulate workflows under one policy")
    p.add_argument("files", nargs="+")
    p.add_argument("--cluster")
    p.add_argument("--policy", default="round_robin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copies", type=int, default=1, help="submit each workflow this many times")
    p.add_argument("--arrival", choices=["all_at_once", "poisson"], default="all_at_once")
    p.add_argument("--utilisation", type=float, default=0.7, help="target utilisation for Poisson arrivals")
    p.add_argument("--trace", help="write one JSON line per executed shard to this file")
    add_controller_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("bench", help="compare policies on a benchmark suite")
    p.add_argument("--suite", choices=["smoke", "real-dag", "prefix-reuse", "agentic", "planner-scale", "runtime"],
                   required=True)
    p.add_argument("--dags", nargs="+", help="files or folders (WfFormat *.json, Alibaba *.csv, Parrot *.jsonl; "
                   "agentic: LMCache agent-trace *.jsonl)")
    p.add_argument("--cluster")
    p.add_argument("--policies", help="comma-separated (default: fate and every baseline)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="output folder (default results/<suite>)")
    p.add_argument("--trace", action="store_true", help="also write trace.jsonl (one line per executed shard)")
    p.add_argument("--jobs", type=int, help="parallel processes (default: all cores)")
    p.add_argument("--workflows-per-instance", type=int, default=WORKFLOWS_PER_INSTANCE, metavar="N",
                   help=f"workflows per instance (default {WORKFLOWS_PER_INSTANCE}; Mooncake traces keep their own "
                   "count)")
    p.add_argument("--truth-perturb", type=float, default=0.0, metavar="F",
                   help="scale every constant of the engine model (the simulator's truth) by a seeded factor in "
                   "[1-F, 1+F]: how results degrade as the planner's estimator grows wrong (default 0)")
    add_controller_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("run", help="run workflows on Ray (joins RAY_ADDRESS, else starts a local cluster)")
    p.add_argument("files", nargs="+")
    p.add_argument("--cluster")
    p.add_argument("--policy", default="fate")
    p.add_argument("--engine", choices=["sim"], default="sim", help="sim: modelled durations (vLLM comes next)")
    p.add_argument("--time-scale", type=float, default=0.01, help="SimEngine: wall seconds per modelled second")
    p.add_argument("--out", default="results/run")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    add_controller_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the main job: ray job submit of example workflows to a local Ray head")
    p.add_argument("--policy", default="fate")
    p.add_argument("--out", default="results/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
