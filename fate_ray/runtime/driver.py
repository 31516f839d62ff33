"""`fate-ray run`'s driver: join or start a Ray cluster, submit workflows to a planner, wait, write the outputs.

Joins the cluster named by `RAY_ADDRESS` (as `ray job submit` sets it); without one, starts an embedded local
cluster with as many fake GPUs as the cluster YAML has devices. Writes, under `--out`, one JSONL file per workflow
(every request's output with the shard, device and times that produced it), `summary.json` (with each workflow's
model loads and wakes) and `gantt.png`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from fate_ray.explain import write_decisions
from fate_ray.runtime.address import join_cluster
from fate_ray.runtime.gantt import plot_gantt
from fate_ray.runtime.service import JobToken
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import Workflow


@dataclass(frozen=True)
class RunConfig:
    out_dir: Path = Path("results/run")
    timeout_s: float = 600.0
    explain: bool = False  # also write decisions.jsonl (fate_ray/explain.py)


def connect(cluster: ClusterSpec) -> bool:
    """Join `RAY_ADDRESS` if set (True), else start an embedded local cluster with one fake GPU per device (False)."""
    if ray.is_initialized():
        return bool(os.environ.get("RAY_ADDRESS"))
    if os.environ.get("RAY_ADDRESS"):
        join_cluster()
        return True
    ray.init(address="local", num_gpus=len(cluster.devices), include_dashboard=False, log_to_driver=False)
    return False


def unique_ids(workflows: Sequence[Workflow]) -> list[Workflow]:
    """Give repeated submissions of one workflow distinct ids (`name`, `name-2`, ...)."""
    ids = distinct([wf.workflow_id for wf in workflows])
    return [wf if wid == wf.workflow_id else wf.with_arrival(wid, wf.arrival_s) for wf, wid in zip(workflows, ids)]


def distinct(names: Sequence[str], max_chars: int | None = None) -> list[str]:
    """The names, a repeat given `-2`, `-3`, ... (never colliding with another name given; cut to `max_chars`)."""
    taken = set(names)
    used: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 1
        while candidate in used or (k > 1 and candidate in taken):  # `a`'s repeat must not become a given `a-2`
            k += 1
            suffix = f"-{k}"
            candidate = (name if max_chars is None else name[: max_chars - len(suffix)]) + suffix
        used.add(candidate)
        out.append(candidate)
    return out


MAX_STEM_CHARS = 100


def file_stem(name: str) -> str:
    """A workflow name as a file name inside the output folder: letters, digits, `.`, `_`, `-` only (anything else,
    path separators included, becomes `_`), no leading dot (so never `..`), at most MAX_STEM_CHARS characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:MAX_STEM_CHARS]
    return stem or "workflow"


def unique_stems(names: Sequence[str]) -> list[str]:
    """Distinct names can sanitise to one stem (`a/b`, `a_b`): later ones get `-2`, `-3`, ..."""
    return distinct([file_stem(name) for name in names], MAX_STEM_CHARS)


def job_id() -> str:
    """This driver's Ray job id: part of every workflow id it submits, so ids are unique across jobs."""
    return ray.get_runtime_context().get_job_id()


RESTART_WAIT_S = 120.0
_RUNS: dict[str, int] = {}  # runs this process has submitted, per job


def ask(method, *args):
    """`ray.get(method.remote(*args))` for the planner's idempotent methods, riding out a planner restart (Ray
    refuses calls while it restarts)."""
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(method.remote(*args))
        except RayActorError as exc:
            if time.monotonic() > deadline or _dead_for_good(exc):
                raise
            time.sleep(0.5)


def _dead_for_good(exc: RayActorError) -> bool:
    """The actor will not come back (`fate-ray down` killed it, or its restarts ran out): no use waiting."""
    actor_id = getattr(exc, "actor_id", None)
    if not actor_id:
        return False
    try:
        from ray.util.state import get_actor

        actor = get_actor(actor_id)
    except Exception:  # noqa: BLE001 -- no state API (an embedded cluster without dashboard): keep waiting
        return False
    return actor is not None and actor.state == "DEAD"


def run_workflows(workflows: Sequence[Workflow], cfg: RunConfig, planner, on_progress=None) -> dict:
    """Submit under this job's id, wait with progress, write outputs; returns the summary (also summary.json).

    The planner may be shared with other jobs: it cancels this job's workflows if this driver dies first.
    """
    job = job_id()
    _RUNS[job] = _RUNS.get(job, 0) + 1  # a driver that runs twice must not reuse its first run's ids
    tag = job if _RUNS[job] == 1 else f"{job}.{_RUNS[job]}"
    local = unique_ids(workflows)
    named = [wf.with_arrival(f"{wf.workflow_id}@{tag}", wf.arrival_s) for wf in local]
    token = JobToken.remote()
    ray.get(planner.watch_job.remote(job, token))
    before = ray.get(planner.stats.remote())["model_events"]
    ids = ray.get(planner.submit.remote(named, job, cfg.explain))
    mine = _wait(planner, job, token, ids, cfg, on_progress)
    return write_results(planner, dict(zip(ids, (wf.workflow_id for wf in local))), mine, cfg.out_dir, before)


def resume_workflows(cfg: RunConfig, planner, on_progress=None) -> dict:
    """Take over every workflow a planner recovered from its journal (`fate-ray run --resume DIR`: the jobs that
    submitted them are gone), wait for them, write their outputs as `run_workflows` would."""
    job = job_id()
    token = JobToken.remote()
    ids = ray.get(planner.adopt.remote(job))
    ray.get(planner.watch_job.remote(job, token))
    before = ray.get(planner.stats.remote())["model_events"]
    mine = _wait(planner, job, token, ids, cfg, on_progress)
    return write_results(planner, {wid: wid.split("@")[0] for wid in ids}, mine, cfg.out_dir, before)


def _wait(planner, job: str, token, ids: list[str], cfg: RunConfig, on_progress) -> list[dict]:
    deadline = time.monotonic() + cfg.timeout_s
    while True:
        # Every poll renews the job's watch: a planner restarted from its journal has forgotten it.
        ask(planner.watch_job, job, token)
        mine = ask(planner.progress, ids)
        if on_progress:
            on_progress(mine)
        if all(p["state"] != "running" for p in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


def write_results(planner, ids: dict[str, str], progress: list[dict], out_dir: Path,
                  model_events_before: dict[str, int] | None = None) -> dict:
    """Write each workflow's requests (`<workflow>.jsonl`, its id in this job made a safe file name), `summary.json` and
    `gantt.png`, then release the workflows from the planner, which forgets them. `ids`: planner id -> local id;
    `model_events_before`: the planner's model event counts when the run began (the summary gives the increase:
    loads, wakes and evictions on the service while the run ran, prefetches and other jobs' included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    all_shards, decisions = [], []
    activations: dict[str, dict[str, int]] = {}
    files = dict(zip(ids, (f"{stem}.jsonl" for stem in unique_stems(list(ids.values())))))
    lost = {p["workflow"] for p in progress if p["state"] == "lost"}
    for wid in ids:
        if wid in lost:  # the planner no longer knows it: nothing to fetch (summary.json says why)
            activations[wid] = {"load": 0, "wake": 0}
            continue
        res = ask(planner.results, wid)
        all_shards += res["shards"]
        decisions += res["decisions"]
        counts = activations[wid] = {"load": 0, "wake": 0}
        for shard in res["shards"]:
            if shard["activation"] in counts:
                counts[shard["activation"]] += 1
        with open(out_dir / files[wid], "w") as fh:
            for shard in sorted(res["shards"], key=lambda s: s["started_s"]):
                for pos, index in enumerate(shard["request_indices"]):
                    fh.write(json.dumps({
                        "workflow": wid, "stage": shard["stage_id"], "request": index, "shard": shard["shard_id"],
                        "device": shard["device_id"], "model": shard["model"],
                        "dispatched_s": shard["dispatched_s"], "start_s": shard["started_s"],
                        "end_s": shard["ended_s"], "output_tokens": shard["output_tokens"][pos],
                        "output": shard["outputs"][pos], **_prefix_fields(shard, pos),
                    }) + "\n")
    for p in progress:  # what each workflow's own shards had to load or wake: 0 when it found its models resident
        p["name"], p["file"] = ids[p["workflow"]], files[p["workflow"]]  # its id in this run; its file (sanitised)
        p["model_loads"], p["model_wakes"] = activations[p["workflow"]]["load"], activations[p["workflow"]]["wake"]
    stats = ask(planner.stats)
    before = model_events_before or {}
    summary = {"workflows": progress, "stats": stats,
               "model_events_during_run": {k: v - before.get(k, 0) for k, v in stats["model_events"].items()},
               "prefix": prefix_summary(all_shards),
               "failed": [p["workflow"] for p in progress if p["state"] != "done"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if decisions:
        write_decisions(sorted(decisions, key=lambda r: r["t_s"]), out_dir / "decisions.jsonl")
    plot_gantt(all_shards, out_dir / "gantt.png", f"fate-ray run: {len(ids)} workflow(s)")
    ask(planner.release, list(ids))
    return summary


def _prefix_fields(shard: dict, pos: int) -> dict:
    """Prompt size, vLLM's cached tokens and the planner's prediction, for requests a real engine ran."""
    if not shard["cached_tokens"]:
        return {}
    return {"prompt_tokens": shard["prompt_tokens_per_request"][pos], "cached_tokens": shard["cached_tokens"][pos],
            "predicted_cached_tokens": shard["predicted_cached_tokens"][pos]}


def prefix_summary(shards: list[dict]) -> dict:
    """The run's prefix hit rate and how far the planner's predicted hits were from vLLM's, per request."""
    rows = [(p, c, q) for s in shards if s["cached_tokens"]
            for p, c, q in zip(s["prompt_tokens_per_request"], s["cached_tokens"], s["predicted_cached_tokens"])]
    if not rows:
        return {}
    drift = sorted(abs(q - c) for _, c, q in rows)
    return {"requests": len(rows), "prompt_tokens": sum(p for p, _, _ in rows),
            "cached_tokens": sum(c for _, c, _ in rows), "predicted_cached_tokens": sum(q for _, _, q in rows),
            "hit_rate": round(sum(c for _, c, _ in rows) / max(1, sum(p for p, _, _ in rows)), 4),
            "drift_tokens_median": drift[len(drift) // 2], "drift_tokens_max": drift[-1]}


def read_requests(out_dir: Path, name: str) -> list[dict]:
    """The rows `write_results` wrote for the workflow named `name` in that run: one per request, in start order."""
    summary = json.loads((out_dir / "summary.json").read_text())
    path = out_dir / next(w["file"] for w in summary["workflows"] if w["name"] == name)
    return [json.loads(line) for line in path.read_text().splitlines()]
