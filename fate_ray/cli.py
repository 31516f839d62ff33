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

from fate_ray.engines.tokens import load_workflows
from fate_ray.schema.cluster import ClusterSpec, default_cluster_path, load_cluster
from fate_ray.schema.errors import InputError, Problem

EXIT_USAGE = 2
LOCAL_CPU_CLUSTER_FILE = "local-cpu.yaml"  # real vLLM engines on this machine's CPU, tiny local models
DEFAULT_TIME_SCALE = 0.01  # = fate_ray.engines.sim_engine.DEFAULT_TIME_SCALE (not imported: keeps startup light)
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

    cluster = _cluster(args.cluster)
    problems: list[str] = []
    for f in args.files:
        try:
            wf = load_workflows([f], cluster, args.engine)[0]  # vllm: counted as a real run will
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
    decisions: list[dict] | None = [] if args.explain else None
    res = simulate(cluster, instances, args.policy, config, record_trace=bool(args.trace), decisions=decisions)
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
    if decisions is not None:
        from fate_ray.explain import write_decisions

        n = write_decisions(decisions, Path(args.explain))
        print(f"{n} placement decisions in {args.explain} (`fate-ray explain {args.explain}`)")
    return 1 if res.failed else 0


def cmd_explain(args) -> int:
    from fate_ray.explain import lookahead_changed, read_decisions
    from fate_ray.explain_table import print_decisions

    records = read_decisions(Path(args.file))
    chosen = [r for r in records if (args.workflow is None or r["workflow"] == args.workflow)
              and (args.stage is None or r["stage"] == args.stage)]
    if not chosen:
        raise ValueError(f"{args.file}: no decision for workflow {args.workflow or '*'} stage {args.stage or '*'} "
                         "(`fate-ray explain FILE` lists them)")
    console = make_console()
    changed = [r for r in chosen if lookahead_changed(r)]
    scored = [r for r in chosen if r["candidates"]]
    console.print(f"{len(chosen)} placement(s) in {args.file}; {len(scored)} with scored candidates; the look-ahead "
                  f"moved {len(changed)} away from the device that would finish them first")
    if args.workflow is None and args.stage is None:
        shown = (changed or scored or chosen)[: args.limit]
        console.print(f"showing {len(shown)} (those the look-ahead moved first; --workflow W --stage S for one)")
    else:
        shown = chosen[: args.limit]
    print_decisions(shown, console)
    return 0


def cmd_bench(args) -> int:
    from fate_ray.bench import run_suite
    from fate_ray.policies import BASELINES, check_policy_names

    if args.suite == "vllm":  # real engines: the tiny local models' cluster unless told otherwise
        from fate_ray.bench.vllm_bench import run_vllm_bench
        from fate_ray.schema.cluster import shipped_cluster_path

        chosen = args.policies.split(",") if args.policies else ["round_robin", "fate", "prefix_affinity"]
        check_policy_names(chosen)
        cluster = _cluster(args.cluster or str(shipped_cluster_path(LOCAL_CPU_CLUSTER_FILE)))
        run_vllm_bench(cluster, chosen, Path(args.out or "results/vllm"), console=make_console())
        return 0
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
    if args.suite == "load":
        from fate_ray.bench.load import run_load

        chosen = args.policies.split(",") if args.policies else ["fate", "round_robin"]
        run_load(cluster, chosen, out, console=make_console())
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

    if args.resume:
        return _resume(args)
    if not args.files:
        raise ValueError("fate-ray run needs workflow files (or --resume DIR to finish the workflows journaled there)")
    cluster = _cluster(args.cluster)
    check_policy_names([args.policy or "fate"])
    engine = args.engine or "sim"
    workflows = load_workflows(args.files, cluster, engine)  # validate everything before touching Ray
    from fate_ray.runtime.driver import RunConfig, connect, run_workflows

    console = make_console()
    shared = connect(cluster)
    planner, service_cluster, service_engine = _planner_for_run(args, cluster, shared, console)
    if (service_cluster, service_engine) != (cluster, engine):  # attached to a service that plans otherwise
        workflows = load_workflows(args.files, service_cluster, service_engine)
    cfg = RunConfig(out_dir=Path(args.out), timeout_s=args.timeout, explain=args.explain)
    return _report_run(run_workflows(workflows, cfg, planner, on_progress=_progress_printer(console)), cfg, console)


def _resume(args) -> int:
    """`fate-ray run --resume DIR`: a planner rebuilt from the journal in DIR finishes what it had, with fresh
    workers (or the running service, which has it already), and this run writes the outputs."""
    from fate_ray.runtime.driver import RunConfig, connect, resume_workflows
    from fate_ray.runtime.journal import Journal

    if args.files:
        raise ValueError("fate-ray run --resume DIR takes no workflow files: it finishes the ones journaled in DIR")
    if not Journal.exists(Path(args.resume)):
        raise ValueError(f"--resume {args.resume}: no planner journal there (`fate-ray run` or `fate-ray up` with "
                         f"--state-dir {args.resume} writes one)")
    args.state_dir = args.resume
    cluster = _cluster(args.cluster)
    console = make_console()
    planner = _planner_for_run(args, cluster, connect(cluster), console)[0]
    cfg = RunConfig(out_dir=Path(args.out), timeout_s=args.timeout)
    summary = resume_workflows(cfg, planner, on_progress=_progress_printer(console))
    console.print(f"resumed {len(summary['workflows'])} workflow(s) from {args.resume}")
    return _report_run(summary, cfg, console)


def _progress_printer(console):
    last: dict[str, str] = {}

    def show(progress):
        for p in progress:
            line = f"{p['workflow']}: {p['stages_done']}/{p['stages']} stages, {p['running_shards']} running, {p['state']}"
            if last.get(p["workflow"]) != line:
                console.print(line)
                last[p["workflow"]] = line

    return show


def _report_run(summary: dict, cfg, console) -> int:
    for p in summary["workflows"]:
        if p["state"] == "failed":
            console.print(f"failed: {p['workflow']}: {p.get('error', '')}")
    during = summary["model_events_during_run"]
    console.print(f"model loads on the service while this run ran: {during['load']} (wakes {during['wake']}, "
                  "prefetches and concurrent jobs included)")
    console.print(f"outputs in {cfg.out_dir}/ ({len(summary['workflows'])} workflows, "
                  f"{len(summary['failed'])} not done)")
    return 1 if summary["failed"] else 0


def _service_config(args):
    from fate_ray.runtime.service import ServiceConfig

    state_dir = str(Path(args.state_dir).resolve()) if args.state_dir else None
    return ServiceConfig(policy=args.policy or "fate", engine=args.engine or "sim",
                         time_scale=args.time_scale or DEFAULT_TIME_SCALE, state_dir=state_dir,
                         **controller_options(args))


def _planner_for_run(args, cluster: ClusterSpec, shared: bool, console):
    """The planner this run submits to: the cluster's service (attached, or started and left running) on a shared
    cluster, else actors scoped to this run. Returns (planner, the cluster it plans)."""
    import ray

    from fate_ray.runtime.service import ServiceError, find_planner, start_actors

    cfg = _service_config(args)
    if not shared:
        return start_actors(cluster, cfg)[0], cluster, cfg.engine
    planner = find_planner()
    if planner is None:
        planner, workers = start_actors(cluster, cfg, detached=True)
        console.print(f"no fate-ray service on this cluster: started one (cluster {cluster.name!r}, policy "
                      f"{cfg.policy}, {len(workers)} workers); it keeps running after this job, `fate-ray down` stops it")
        return planner, cluster, cfg.engine
    info = ray.get(planner.info.remote())
    if args.cluster and info["cluster"] != cluster:
        raise ServiceError(f"the running fate-ray service plans cluster {info['cluster'].name!r}, not {args.cluster}: "
                           "omit --cluster, or `fate-ray down` and start it with this one")
    if args.policy and info["policy"] != args.policy:
        raise ServiceError(f"the running fate-ray service plans with policy {info['policy']!r}, not {args.policy!r}: "
                           "omit --policy, or `fate-ray down` and `fate-ray up --policy` to change it")
    if args.engine and info["engine"] != args.engine:
        raise ServiceError(f"the running fate-ray service runs engine {info['engine']!r}, not {args.engine!r}: "
                           "omit --engine, or `fate-ray down` and `fate-ray up --engine` to change it")
    console.print(f"attached to the fate-ray service (cluster {info['cluster'].name!r}, policy {info['policy']}, "
                  f"{info['devices']} workers)")
    return planner, info["cluster"], info["engine"]


def _join_cluster(command: str) -> None:
    import os

    from fate_ray.runtime.address import join_cluster
    from fate_ray.runtime.service import ServiceError

    if not os.environ.get("RAY_ADDRESS"):
        raise ServiceError(f"fate-ray {command} works on a running Ray cluster: set RAY_ADDRESS to its address "
                           "(e.g. 127.0.0.1:6390 for the README's head)")
    join_cluster()


def cmd_up(args) -> int:
    import ray

    from fate_ray.policies import check_policy_names
    from fate_ray.runtime.service import find_planner, start_actors

    cluster = _cluster(args.cluster)
    check_policy_names([args.policy or "fate"])
    _join_cluster("up")
    planner = find_planner()
    if planner is not None:
        info = ray.get(planner.info.remote())
        running = (f"the fate-ray service is already running (cluster {info['cluster'].name!r}, policy "
                   f"{info['policy']}, engine {info['engine']}, {info['devices']} workers)")
        asked = {"cluster": args.cluster and cluster != info["cluster"], "policy": args.policy not in (None, info["policy"]),
                 "engine": args.engine not in (None, info["engine"])}
        if any(asked.values()):
            from fate_ray.runtime.service import ServiceError

            raise ServiceError(f"{running}, not with the {', '.join(k for k, v in asked.items() if v)} asked for: "
                               "`fate-ray down` first to change it")
        print(f"{running}; `fate-ray down` stops it")
        return 0
    cfg = _service_config(args)
    _, workers = start_actors(cluster, cfg, detached=True)
    print(f"started the fate-ray service: fate-planner and {len(workers)} workers in namespace 'fate' (cluster "
          f"{cluster.name!r}, policy {cfg.policy}); jobs attach with `fate-ray run`, `fate-ray down` stops it")
    return 0


def cmd_down(args) -> int:
    from fate_ray.runtime.service import stop_service

    _join_cluster("down")
    names = stop_service()
    print(f"stopped {len(names)} fate-ray actor(s)" if names else "no fate-ray service was running")
    return 0


def cmd_status(args) -> int:
    import ray
    from rich.table import Table

    from fate_ray.runtime.service import find_planner

    _join_cluster("status")
    planner = find_planner()
    if planner is None:
        print("no fate-ray service on this cluster; `fate-ray up` starts one")
        return 1
    st = ray.get(planner.service_status.remote())
    console = make_console()
    console.print(f"fate-ray service: cluster {st['cluster']!r}, policy {st['policy']}, model loads "
                  f"{st['model_events']['load']}, wakes {st['model_events']['wake']}, evictions "
                  f"{st['model_events']['evict']}")
    devices = Table("device", "alive", "running", "queued", "resident models")
    for d in st["devices"]:
        devices.add_row(d["device"], "yes" if d["alive"] else "no", f"{d['running']}/{d['concurrency']}",
                        str(d["queued"]), ", ".join(d["resident"]) or "-")
    console.print(devices)
    if st["workflows"]:
        workflows = Table("workflow", "job", "stages", "state")
        for w in st["workflows"]:
            workflows.add_row(w["workflow"], w["job"], f"{w['stages_done']}/{w['stages']}", w["state"])
        console.print(workflows)
    else:
        console.print("no workflows running")
    return 0


def cmd_stop_head(args) -> int:
    from fate_ray.runtime.local_head import stop_head

    temp_dir = Path(args.temp_dir).resolve()
    n = stop_head(temp_dir)
    print(f"stopped {n} Ray process(es) of the head in {temp_dir}" if n else f"no Ray process uses {temp_dir}")
    return 0


def cmd_demo(args) -> int:
    """The main job: the README's service steps on a local head (fate_ray/runtime/demo.py)."""
    from fate_ray.runtime.demo import run_demo
    from fate_ray.schema.cluster import shipped_cluster_path

    cluster_path = Path(args.cluster) if args.cluster else (
        default_cluster_path() if args.engine == "sim" else shipped_cluster_path(LOCAL_CPU_CLUSTER_FILE))
    return run_demo(_cluster(str(cluster_path)), cluster_path, Path(__file__).resolve().parents[1],
                    Path(args.out).resolve(), args.policy, make_console(), args.engine)


def controller_options(args) -> dict:
    """The Controller settings every policy of a run shares, as SimConfig keywords."""
    return {"queue_order": args.queue_order, "prefetch": not args.no_prefetch}


def add_controller_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue-order", choices=QUEUE_ORDERS, default=QUEUE_ORDERS[0],
                   help="how every device orders its queue, for every policy: arrival = oldest workflow first, then "
                   "upward rank; rank = upward rank first; fifo = placement order (default %(default)s)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="switch off the Controller's generic prefetch of the next stages' models (every policy)")


def add_service_options(p: argparse.ArgumentParser) -> None:
    """What the planner service is started with; a run attaching to a running service must not ask otherwise."""
    p.add_argument("--cluster", help="cluster YAML (default: the mixed H100/L4 cluster, or the running service's)")
    p.add_argument("--policy", help="planning policy (default: fate, or the running service's)")
    p.add_argument("--engine", choices=["sim", "vllm"],
                   help="sim: modelled durations (default); vllm: real inference, one vLLM engine per resident model "
                   "(needs the cpu or gpu extra and the cluster file's model paths, e.g. workflows/clusters/local-cpu.yaml)")
    p.add_argument("--time-scale", type=float,
                   help=f"SimEngine: wall seconds per modelled second (default {DEFAULT_TIME_SCALE})")
    p.add_argument("--state-dir", metavar="DIR", help="journal the planner's state here; a planner that dies is "
                   "restarted by Ray and replays it, losing nothing (on KubeRay: a volume)")
    add_controller_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fate-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check workflow YAML files against a cluster's model catalog")
    p.add_argument("files", nargs="+")
    p.add_argument("--cluster", help="cluster YAML (default: the mixed H100/L4 cluster)")
    p.add_argument("--engine", choices=["sim", "vllm"], default="sim",
                   help="vllm: count prompt tokens with each model's tokenizer, as a real run does (default: "
                   "characters / 4)")
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
    p.add_argument("--explain", metavar="FILE", help="write one JSON line per placement: each candidate device's "
                   "terms and the choice (read it with `fate-ray explain FILE`)")
    add_controller_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("explain", help="why each stage went where it did: candidate devices' terms, the choice and "
                       "the runner-up, from a decisions file (`simulate --explain FILE`, `run --explain`)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--workflow", metavar="W", help="only this workflow's placements")
    p.add_argument("--stage", metavar="S", help="only this stage's placements")
    p.add_argument("--limit", type=int, default=10, help="show at most this many placements (default 10)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", help="compare policies on a benchmark suite")
    p.add_argument("--suite", choices=["smoke", "real-dag", "prefix-reuse", "agentic", "planner-scale", "runtime",
                                       "load", "vllm"],
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

    p = sub.add_parser("run", help="run workflows on Ray: on RAY_ADDRESS's cluster through its fate-ray service "
                       "(started if none), else on an embedded local cluster")
    p.add_argument("files", nargs="*")
    p.add_argument("--resume", metavar="DIR", help="finish the workflows of a planner journaled in DIR (its "
                   "--state-dir) after the service went down: rebuilds the planner from the journal, takes them over, "
                   "writes their outputs")
    p.add_argument("--out", default="results/run")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--explain", action="store_true", help="also write OUT/decisions.jsonl: each placement's "
                   "candidate devices, their terms and the choice (read it with `fate-ray explain`)")
    add_service_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("up", help="start the fate-ray service (planner + one worker per GPU) on RAY_ADDRESS's cluster")
    add_service_options(p)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the fate-ray service on RAY_ADDRESS's cluster")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="devices, resident models, queues and running workflows of the service")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stop-head", help="stop the Ray head started with --temp-dir DIR, and only that one "
                       "(`ray stop` stops every Ray on the machine)")
    p.add_argument("temp_dir", metavar="DIR")
    p.set_defaults(func=cmd_stop_head)

    p = sub.add_parser("demo", help="the main job: a local Ray head, the planner service, concurrent and repeated "
                       "`ray job submit`s of example workflows")
    p.add_argument("--policy", default="fate")
    p.add_argument("--engine", choices=["vllm", "sim"], default="vllm",
                   help="vllm (default): real vLLM engines on the tiny local models (`make tiny-models`); sim: "
                   "simulated engines on the default cluster")
    p.add_argument("--cluster", help=f"cluster YAML (default: {LOCAL_CPU_CLUSTER_FILE} for vllm, the default cluster "
                   "for sim)")
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
    except (ValueError, FileNotFoundError) as exc:  # incl. ServiceError
        cause = getattr(exc, "cause", None)  # a RayTaskError wrapping the remote error: say that one, briefly
        if cause is not None:
            exc = cause
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not type(exc).__module__.startswith("ray."):
            raise  # our bug: keep its traceback
        # The planner or a worker died under us (`fate-ray down`, a crash): one sentence, not Ray's stack.
        first = (str(getattr(exc, "cause", None) or exc).strip().splitlines() or [""])[0]
        print(f"error: the fate-ray service failed: {type(exc).__name__}: {first[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
