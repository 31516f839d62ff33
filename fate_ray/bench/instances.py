"""Benchmark suites as lists of instances: a named set of workflows plus how they arrive.

- `smoke`: the shipped example workflows (workflows/*.yaml), twice each, Poisson at 70% utilisation.
- `real-dag`: each WfCommons file is one instance (the DAG submitted `copies` times); Alibaba jobs are grouped
  `alibaba_jobs_per_instance` at a time; Parrot MetaGPT logs are one instance each. Poisson at 70% utilisation.
  A Mooncake trace file given by name is one instance of its first `MOONCAKE_REQUESTS` requests at their traced
  arrival times (one single-request workflow each).
- `prefix-reuse`: every shape of sim/workloads.py at every sharing ratio, `copies` workflows per instance, grouped
  by sharing ratio in the report.
The DAG-to-LLM mapping uses seed 0 (an instance is a fixed workload); the run seed varies arrivals, output lengths
and noise, identically for every policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fate_ray.cost import CostEstimator
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.schema.errors import InputError, Problem
from fate_ray.sim.arrivals import ArrivalMode, arrivals
from fate_ray.sim.workloads import SHAPES, SHARING_RATIOS, make_workflow
from fate_ray.workload import Workflow

SUITES = ("smoke", "real-dag", "prefix-reuse")
UTILISATION = 0.7
MOONCAKE_REQUESTS = 2000


@dataclass(frozen=True)
class Instance:
    name: str
    workflows: tuple[Workflow, ...]
    arrival: ArrivalMode = "poisson"
    utilisation: float = UTILISATION
    group: str = ""  # reports also aggregate per group (e.g. sharing ratio)

    def realise(self, seed: int, estimator: CostEstimator) -> list[Workflow]:
        return arrivals(self.workflows, self.arrival, estimator, seed, self.utilisation)


def examples_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "workflows"


def smoke_instances(cluster: ClusterSpec, files: Sequence[Path] | None = None) -> list[Instance]:
    from fate_ray.schema.workflow import load_workflow

    files = files or sorted(examples_dir().glob("*.yaml"))
    if not files:
        raise InputError([Problem(str(examples_dir()), 1, "no example workflows found; pass --dags or run from a "
                                 "source checkout")])
    wfs = [load_workflow(f, cluster)[1] for f in files]
    return [Instance("examples-mixed", tuple(wfs) * 2),
            Instance("examples-batch", tuple(wfs), arrival="all_at_once")]


def real_dag_instances(paths: Sequence[str], cluster: ClusterSpec, copies: int = 6,
                       alibaba_jobs_per_instance: int = 10) -> list[Instance]:
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
    out = [Instance(_short(w), (w,) * copies) for w in singles]
    for k in range(0, len(jobs), alibaba_jobs_per_instance):
        group = tuple(jobs[k:k + alibaba_jobs_per_instance])
        out.append(Instance(f"alibaba-{k // alibaba_jobs_per_instance:02d}", group))
    for trace in traces:
        requests = load_mooncake(trace, limit=MOONCAKE_REQUESTS)
        out.append(Instance(f"mooncake-{len(requests)}", tuple(requests), arrival="trace"))
    return out


def _is_mooncake(path: Path) -> bool:
    """A named .jsonl file whose first record has Mooncake's `hash_ids` (folders are scanned by load_dags)."""
    if not (path.is_file() and path.suffix == ".jsonl"):
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        return '"hash_ids"' in fh.readline()


def _short(w: Workflow) -> str:
    return Path(w.source).stem if w.source else w.name


def prefix_reuse_instances(copies: int = 16) -> list[Instance]:
    out = []
    for sharing in SHARING_RATIOS:
        for shape in SHAPES:
            group = f"sharing={sharing:g}"
            wfs = tuple(make_workflow(shape, sharing, f"{shape}-{group}", k) for k in range(copies))
            out.append(Instance(f"{shape}-s{sharing:g}", wfs, group=group))
    return out


def suite_instances(suite: str, cluster: ClusterSpec, dags: Sequence[str] = ()) -> list[Instance]:
    if suite == "smoke":
        return smoke_instances(cluster, [Path(p) for p in dags] if dags else None)
    if suite == "real-dag":
        return real_dag_instances(dags, cluster)
    if suite == "prefix-reuse":
        return prefix_reuse_instances()
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
