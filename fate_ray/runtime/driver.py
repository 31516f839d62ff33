"""`fate-ray run`: validate workflows, join or start a Ray cluster, start the planner and workers, run, report.

Joins the cluster named by `RAY_ADDRESS` (as `ray job submit` sets it); without one, starts an embedded local
cluster with as many fake GPUs as the cluster YAML has devices. Writes, under `--out`, one JSONL file per workflow
(every request's output with the shard, device and times that produced it) and `summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from fate_ray.controller import DEFAULT_QUEUE_ORDER, QueueOrder
from fate_ray.engines.physics import Draws
from fate_ray.engines.sim_engine import DEFAULT_TIME_SCALE
from fate_ray.runtime.gantt import plot_gantt
from fate_ray.runtime.planner import PLANNER_NAME, PlannerActor
from fate_ray.runtime.worker import GpuWorker, worker_name
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import Workflow


@dataclass(frozen=True)
class RunConfig:
    policy: str = "fate"
    engine: str = "sim"
    time_scale: float = DEFAULT_TIME_SCALE
    out_dir: Path = Path("results/run")
    timeout_s: float = 600.0
    seed: int = 0
    fail_stages: frozenset[str] = frozenset()  # SimEngine fault injection (tests)
    draws: Draws | None = None  # SimEngine's random draws; None = the simulator's defaults
    queue_order: QueueOrder = DEFAULT_QUEUE_ORDER  # the Controller's device-queue order (as in the simulator)
    prefetch: bool = True  # the Controller's generic prefetch


def connect(cluster: ClusterSpec) -> None:
    """Join `RAY_ADDRESS` if set, else start a local cluster with one fake GPU per device."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_gpus=len(cluster.devices), include_dashboard=False, log_to_driver=False)


def start_actors(cluster: ClusterSpec, cfg: RunConfig, name_suffix: str = ""):
    """One GpuWorker per device and the planner (`fate-planner`, plus `name_suffix` when several runs share a
    cluster); returns the planner handle and the workers by device id."""
    workers = {d.device_id: GpuWorker.options(name=worker_name(d.device_id) + name_suffix).remote(
        cluster, d.device_id, cfg.engine, cfg.time_scale, cfg.fail_stages, cfg.draws) for d in cluster.devices}
    ray.get([w.ping.remote() for w in workers.values()])
    name = PLANNER_NAME + name_suffix
    planner = PlannerActor.options(name=name).remote(cluster, cfg.policy, workers, cfg.seed, cfg.time_scale, name,
                                                     cfg.queue_order, cfg.prefetch)
    return planner, workers


def unique_ids(workflows: Sequence[Workflow]) -> list[Workflow]:
    """Give repeated submissions of one workflow distinct ids (`name`, `name-2`, ...)."""
    seen: dict[str, int] = {}
    out = []
    for wf in workflows:
        seen[wf.workflow_id] = seen.get(wf.workflow_id, 0) + 1
        k = seen[wf.workflow_id]
        out.append(wf if k == 1 else wf.with_arrival(f"{wf.workflow_id}-{k}", wf.arrival_s))
    return out


def run_workflows(cluster: ClusterSpec, workflows: Sequence[Workflow], cfg: RunConfig, planner=None,
                  on_progress=None) -> dict:
    """Submit, wait with progress, write outputs; returns the summary (also written to summary.json)."""
    if planner is None:
        planner, _ = start_actors(cluster, cfg)
    workflows = unique_ids(workflows)
    ids = ray.get(planner.submit.remote(list(workflows)))
    deadline = time.monotonic() + cfg.timeout_s
    while True:
        progress = ray.get(planner.progress.remote())
        mine = [p for p in progress if p["workflow"] in ids]
        if on_progress:
            on_progress(mine)
        if all(p["state"] != "running" for p in mine) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return write_results(planner, ids, mine, cfg.out_dir)


def write_results(planner, ids: list[str], progress: list[dict], out_dir: Path) -> dict:
    """Write each workflow's requests (`<workflow>.jsonl`), `summary.json` and `gantt.png`, then release the
    workflows from the planner, which forgets them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    all_shards = []
    for wid in ids:
        res = ray.get(planner.results.remote(wid))
        all_shards += res["shards"]
        with open(out_dir / f"{wid.replace('/', '_')}.jsonl", "w") as fh:
            for shard in sorted(res["shards"], key=lambda s: s["started_s"]):
                for pos, index in enumerate(shard["request_indices"]):
                    fh.write(json.dumps({
                        "workflow": wid, "stage": shard["stage_id"], "request": index, "shard": shard["shard_id"],
                        "device": shard["device_id"], "model": shard["model"],
                        "dispatched_s": shard["dispatched_s"], "start_s": shard["started_s"],
                        "end_s": shard["ended_s"], "output_tokens": shard["output_tokens"][pos],
                        "output": shard["outputs"][pos],
                    }) + "\n")
    summary = {"workflows": progress, "stats": ray.get(planner.stats.remote()),
               "failed": [p["workflow"] for p in progress if p["state"] != "done"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_gantt(all_shards, out_dir / "gantt.png", f"fate-ray run: {len(ids)} workflow(s)")
    ray.get(planner.release.remote(ids))
    return summary


def read_requests(out_dir: Path, workflow_id: str) -> list[dict]:
    """The rows `write_results` wrote for one workflow: one per request, in start order."""
    path = out_dir / f"{workflow_id.replace('/', '_')}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
