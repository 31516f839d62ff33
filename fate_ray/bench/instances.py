"""Benchmark suites as lists of instances: a named stream of workflows plus how they arrive.

An instance is a stream of at least `workflows_per_instance` workflows (N, default 50, `--workflows-per-instance`):
- `smoke`: the shipped example workflows (workflows/*.yaml, or the `--dags` files) repeated in whole rounds until
  there are at least N: `examples-mixed` Poisson at 70% utilisation, `examples-batch` all at t = 0.
- `real-dag`: each WfCommons file or Parrot MetaGPT log is one instance (its DAG submitted N times); Alibaba jobs
  are taken N at a time (`chunks`). Poisson at 70% utilisation. A Mooncake trace file given by name is one
  instance of its first `MOONCAKE_REQUESTS` requests at their traced arrival times (one single-request workflow
  each).
- `prefix-reuse`: every shape of sim/workloads.py at every sharing ratio, N workflows per instance, grouped by
  sharing ratio in the report. Poisson at 70% utilisation.
- `agentic`: the LMCache agent sessions (traces/lmcache.py) of each `--dags` path, N at a time (`chunks`), Poisson
  at 70% utilisation: the traced session starts come from a benchmark harness that ran the sessions one after
  another (tau-bench: 24 sessions in 180 s), a closed loop that loads the cluster to about 4%, so they are kept
  in the workflows (`arrival_s`) but not used.
Every instance then runs in both regimes, `<name>@cold` and `<name>@warm` (bench/regimes.py), grouped by regime.
The DAG-to-LLM mapping uses seed 0 (an instance is a fixed workload); the run seed varies arrivals, output lengths
and noise, identically for every policy and both regimes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fate_ray.bench.regimes import InitialModels, with_regimes
from fate_ray.cost import CostEstimator
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.schema.errors import InputError, Problem
from fate_ray.sim.arrivals import ArrivalMode, arrivals
from fate_ray.sim.workloads import SHAPES, SHARING_RATIOS, make_workflow
from fate_ray.workload import Workflow

SUITES = ("smoke", "real-dag", "prefix-reuse", "agentic")
UTILISATION = 0.7
MOONCAKE_REQUESTS = 2000
WORKFLOWS_PER_INSTANCE = 50


@dataclass(frozen=True)
class Instance:
    name: str
    workflows: tuple[Workflow, ...]
    arrival: ArrivalMode = "poisson"
    utilisation: float = UTILISATION
    group: str = ""  # reports also aggregate per group (regime, plus e.g. the sharing ratio)
    regime: str = "cold"
    initial_models: InitialModels = ()  # (device id, models ACTIVE there at t = 0): the warm regime

    def realise(self, seed: int, estimator: CostEstimator) -> list[Workflow]:
        return arrivals(self.workflows, self.arrival, estimator, seed, self.utilisation)


def repeated(workflows: Sequence[Workflow], n: int) -> tuple[Workflow, ...]:
    """The workflows in whole rounds, as few as give at least `n` (each workflow equally often)."""
    return tuple(workflows) * max(1, math.ceil(n / max(1, len(workflows))))


def chunks(workflows: Sequence[Workflow], n: int) -> list[tuple[Workflow, ...]]:
    """Consecutive groups of exactly `n`; the last one is topped up from the start, cycling if there are fewer."""
    if not workflows:
        return []
    out = []
    for start in range(0, len(workflows), n):
        group = list(workflows[start:start + n])
        k = 0
        while len(group) < n:
            group.append(workflows[k % len(workflows)])
            k += 1
        out.append(tuple(group))
    return out


def examples_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "workflows"


def example_workflows(cluster: ClusterSpec, files: Sequence[Path] | None = None) -> list[Workflow]:
    """The shipped example workflows (or `files`), validated against `cluster`, in file-name order."""
    from fate_ray.schema.workflow import load_workflow

    files = files or sorted(examples_dir().glob("*.yaml"))
    if not files:
        raise InputError([Problem(str(examples_dir()), 1, "no example workflows found; pass --dags or run from a "
                                 "source checkout")])
    return [load_workflow(f, cluster)[1] for f in files]


def smoke_instances(cluster: ClusterSpec, files: Sequence[Path] | None = None,
                    workflows_per_instance: int = WORKFLOWS_PER_INSTANCE) -> list[Instance]:
    wfs = repeated(example_workflows(cluster, files), workflows_per_instance)
    return [Instance("examples-mixed", wfs), Instance("examples-batch", wfs, arrival="all_at_once")]


def real_dag_instances(paths: Sequence[str], cluster: ClusterSpec,
                       workflows_per_instance: int = WORKFLOWS_PER_INSTANCE) -> list[Instance]:
    from fate_ray.traces import load_dags

    if not paths:
        raise InputError([Problem("--dags", 1, "the real-dag suite needs --dags PATH (WfFormat JSON or Alibaba CSV "
                                 "files or folders, e.g. ../shared/realdags/wfcommons)")])
    from fate_ray.traces import load_mooncake
    from fate_ray.traces.common import catalog_models_of

    catalog = catalog_models_of(cluster)
    traces = [p for p in paths if _is_mooncake(Path(p))]
    workflows = load_dags([p for p in paths if p not in traces], 0, catalog) if len(traces) < len(paths) else []
    singles = [w for w in workflows if not w.source.endswith(".csv")]
    jobs = [w for w in workflows if w.source.endswith(".csv")]
    out = [Instance(_short(w), repeated([w], workflows_per_instance)) for w in singles]
    for k, group in enumerate(chunks(jobs, workflows_per_instance)):
        out.append(Instance(f"alibaba-{k:02d}", group))
    for trace in traces:
        requests = load_mooncake(trace, limit=MOONCAKE_REQUESTS)
        out.append(Instance(f"mooncake-{len(requests)}", tuple(requests), arrival="trace"))
    return out


def agentic_instances(paths: Sequence[str], cluster: ClusterSpec,
                      workflows_per_instance: int = WORKFLOWS_PER_INSTANCE) -> list[Instance]:
    from fate_ray.traces import load_lmcache
    from fate_ray.traces.common import catalog_models_of

    if not paths:
        raise InputError([Problem("--dags", 1, "the agentic suite needs --dags PATH (LMCache agent-trace .jsonl "
                                 "files or folders, e.g. ../shared/realdags/lmcache_agent_trace/taubench)")])
    catalog = catalog_models_of(cluster)
    out = []
    for path in paths:
        sessions = load_lmcache(path, 0, catalog)
        if not sessions:
            raise InputError([Problem(str(path), 1, "no LMCache agent session found (expected .jsonl lines of "
                                     "{timestamp, input, output, session_id})")])
        groups = chunks(sessions, workflows_per_instance)
        for k, group in enumerate(groups):
            suffix = f"-{k:02d}" if len(groups) > 1 else ""
            out.append(Instance(f"agentic-{Path(path).stem}{suffix}", group))
    return out


def _is_mooncake(path: Path) -> bool:
    """A named .jsonl file whose first record has Mooncake's `hash_ids` (folders are scanned by load_dags)."""
    if not (path.is_file() and path.suffix == ".jsonl"):
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        return '"hash_ids"' in fh.readline()


def _short(w: Workflow) -> str:
    return Path(w.source).stem if w.source else w.name


def prefix_reuse_instances(workflows_per_instance: int = WORKFLOWS_PER_INSTANCE) -> list[Instance]:
    out = []
    for sharing in SHARING_RATIOS:
        for shape in SHAPES:
            group = f"sharing={sharing:g}"
            wfs = tuple(make_workflow(shape, sharing, f"{shape}-{group}", k) for k in range(workflows_per_instance))
            out.append(Instance(f"{shape}-s{sharing:g}", wfs, group=group))
    return out


def suite_instances(suite: str, cluster: ClusterSpec, dags: Sequence[str] = (),
                    workflows_per_instance: int = WORKFLOWS_PER_INSTANCE) -> list[Instance]:
    """The suite's instances, each in the cold then the warm regime."""
    if workflows_per_instance < 1:
        raise ValueError("--workflows-per-instance must be at least 1")
    n = workflows_per_instance
    if suite == "smoke":
        base = smoke_instances(cluster, [Path(p) for p in dags] if dags else None, n)
    elif suite == "real-dag":
        base = real_dag_instances(dags, cluster, n)
    elif suite == "prefix-reuse":
        base = prefix_reuse_instances(n)
    elif suite == "agentic":
        base = agentic_instances(dags, cluster, n)
    else:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    return with_regimes(base, cluster)
