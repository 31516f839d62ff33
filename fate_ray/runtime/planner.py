"""PlannerActor (named `fate-planner`): the Controller in a thin async shell.

Events come from the driver (workflows) and from worker calls finishing; each is handed to `Controller.handle`
in a worker thread (planning must not block the event loop), one at a time under a lock; the commands that come
back are executed with `.remote()` calls whose results are awaited, never `ray.get`. A worker that dies
mid-shard surfaces as a RayActorError on that await: the Controller hears `WorkerLost` and re-plans the shard's
requests elsewhere; a late reply from it is dropped by the Controller, so no output is lost or recorded twice.

The actor never reads the Controller's internals: what it shows or measures comes from the commands `handle`
returns and from `Controller.status()`, taken under the same lock as `handle`. Once the driver has written a
workflow's results it calls `release`, and the Controller and this actor forget the workflow, so a long-lived
planner's memory does not grow with its history.

As the cluster's service (service.py) it is shared by every job: each workflow records the Ray job that submitted
it, and when that job's `JobToken` dies (`watch_job`) its unfinished workflows are cancelled and forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from fate_ray.controller import DEFAULT_QUEUE_ORDER, Controller, QueueOrder
from fate_ray.cost import Calibration, CostEstimator
from fate_ray.events import (
    Dispatch,
    LoadModel,
    PlannerRestarted,
    ShardFailed,
    ShardFinished,
    StageDone,
    WorkerLost,
    WorkflowCancelled,
    WorkflowDone,
    WorkflowReleased,
    WorkflowSubmitted,
)
from fate_ray.explain import DecisionLog
from fate_ray.metrics import PlannerMetrics
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import PlanTimer
from fate_ray.policies.guard import GuardedPolicy
from fate_ray.runtime.journal import Journal, ReplayPolicy
from fate_ray.runtime.reports import REPORT_INTERVAL_S, ReportGate
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import Workflow

PLANNER_NAME = "fate-planner"
logger = logging.getLogger(__name__)


@dataclass
class ShardRecord:
    shard_id: str
    workflow_id: str
    stage_id: str
    device_id: str
    model: str
    request_indices: tuple[int, ...]
    dispatched_s: float
    activation: str = "resident"  # what the device had to do first: resident, wake or load
    started_s: float = 0.0
    ended_s: float = 0.0
    outputs: tuple[str, ...] = ()
    output_tokens: tuple[int, ...] = ()
    status: str = "running"  # running, done, failed or lost
    # Per request. Real engines: the engine's prompt size and vLLM's cached tokens; the planner's prediction.
    prompt_tokens_per_request: tuple[int, ...] = ()
    cached_tokens: tuple[int, ...] = ()
    predicted_cached_tokens: tuple[int, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_tokens_per_request)

    def finished(self, started_s: float, ended_s: float, outputs: tuple[str, ...], output_tokens: tuple[int, ...],
                 prompt_tokens: tuple[int, ...] = (), cached_tokens: tuple[int, ...] = ()) -> None:
        """Its worker's result (live, or replayed from the journal): real engines also say what they counted."""
        self.status, self.started_s, self.ended_s = "done", started_s, ended_s
        self.outputs, self.output_tokens = outputs, output_tokens
        if prompt_tokens:
            self.prompt_tokens_per_request, self.cached_tokens = prompt_tokens, cached_tokens


@dataclass
class WorkflowRecord:
    submitted_s: float
    job: str = ""  # the Ray job that submitted it (the service cancels its workflows when that job goes away)
    done: WorkflowDone | None = None
    done_wall_s: float = 0.0
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@ray.remote(num_cpus=0)
class PlannerActor:
    def __init__(self, cluster: ClusterSpec, policy: str, workers: dict, seed: int = 0, time_scale: float = 1.0,
                 name: str = PLANNER_NAME, queue_order: QueueOrder = DEFAULT_QUEUE_ORDER, prefetch: bool = True,
                 engine: str = "sim", state_dir: str | None = None, report_interval_s: float = REPORT_INTERVAL_S):
        self.cluster = cluster
        self.engine = engine
        self.seed = seed
        estimator = CostEstimator(cluster, Calibration())
        self.timer = self._make_timer(policy, estimator)
        # Every engine reports each request's prefix hits, so the planner predicts them (the drift metric).
        self.controller = Controller(cluster, self.timer, estimator, queue_order=queue_order, prefetch=prefetch,
                                     predict_cache_hits=True)
        self.policy_name = policy
        self.metrics = PlannerMetrics(name)
        self._gauge_task: asyncio.Task | None = None
        self.workers = dict(workers)  # device id -> actor handle
        self.lock = asyncio.Lock()
        self.t0 = time.monotonic()
        # The Controller's clock runs in the engines' seconds: modelled seconds for SimEngine (wall / time_scale).
        self.time_scale = time_scale
        self.workflows: dict[str, WorkflowRecord] = {}
        self.shards: dict[str, ShardRecord] = {}
        self.tasks: set[asyncio.Task] = set()
        self.model_events = {"load": 0, "wake": 0, "evict": 0}  # over the planner's life (prefetches included)
        self.watched_jobs: set[str] = set()
        self.gone_jobs: set[str] = set()  # jobs whose token died (bounded by the jobs a service ever sees)
        self.cancelled_workflows = 0
        # Real engines report their state (after every shard, and every interval); SimEngine's truth is the
        # simulator's own model, in keys the planner does not share, so it reports nothing.
        self.reports = ReportGate(report_interval_s if engine == "vllm" else 0.0)
        self.journal = Journal(Path(state_dir)) if state_dir else None
        self._restarted = False
        if self.journal is not None and not self.journal.empty:
            self._recover()

    def _make_timer(self, policy: str, estimator: CostEstimator) -> PlanTimer:
        # Guarded: a round that raises, stalls or returns a broken plan falls back to least_loaded (policies/guard.py).
        guarded = GuardedPolicy(make_policy(policy, PolicyContext(self.cluster, estimator, self.seed)))
        # Decision records of the workflows submitted with `explain` (fate-ray run --explain); not journaled, so a
        # restarted planner explains only the rounds after its restart.
        self.decisions = DecisionLog(guarded)
        return PlanTimer(guarded, keep_history=False, observers=[self.decisions])

    def _now_s(self) -> float:
        return (time.monotonic() - self.t0) / self.time_scale

    # -- driver API -------------------------------------------------------------------------------------------------
    async def info(self) -> dict:
        """What the service was started with: a job attaching to it plans against this cluster and policy."""
        await self._ensure_started()
        return {"cluster": self.cluster, "policy": self.policy_name, "engine": self.engine,
                "time_scale": self.time_scale, "devices": len(self.workers)}

    async def submit(self, workflows: list[Workflow], job: str = "", explain: bool = False) -> list[str]:
        """`explain`: keep each placement's decision record for `results` (fate_ray/explain.py)."""
        await self._ensure_started()
        ids = []
        for wf in workflows:
            if wf.workflow_id in self.workflows:
                raise ValueError(f"workflow id {wf.workflow_id!r} is already running on this planner")
            self.workflows[wf.workflow_id] = WorkflowRecord(time.time(), job)
            if explain:
                self.decisions.explain(wf.workflow_id)
            self._journal(("workflow", wf.workflow_id, job, self.workflows[wf.workflow_id].submitted_s))
            try:
                await self._handle(WorkflowSubmitted(wf.with_arrival(wf.workflow_id, self._now_s()), self._now_s()))
            except Exception:
                self.workflows.pop(wf.workflow_id, None)  # never half-submitted: nothing would ever remove it
                raise
            ids.append(wf.workflow_id)
            if job in self.gone_jobs:  # the job went away while it was still submitting
                await self._cancel_job(job)
        return ids

    async def wait(self, workflow_ids: list[str], timeout_s: float | None = None) -> dict[str, dict]:
        waits = [self.workflows[w].finished.wait() for w in workflow_ids]
        await asyncio.wait_for(asyncio.gather(*waits), timeout_s)
        status = await self._status()
        return {w: self._progress_of(w, status) for w in workflow_ids}

    async def _status(self, outputs_of: tuple[str, ...] = ()):
        async with self.lock:
            return self.controller.status(outputs_of)

    def _progress_of(self, workflow_id: str, status) -> dict:
        rec = self.workflows[workflow_id]
        wf = status.workflows.get(workflow_id)
        running = sum(1 for s in self.shards.values() if s.workflow_id == workflow_id and s.status == "running")
        out = {"workflow": workflow_id, "stages_done": wf.stages_done if wf else 0, "stages": wf.stages if wf else 0,
               "running_shards": running, "state": "running"}
        if rec.done is not None:
            out.update(state="done" if rec.done.ok else "failed", error=rec.done.error,
                       latency_s=rec.done_wall_s - rec.submitted_s)
        return out

    async def progress(self, workflow_ids: list[str] | None = None) -> list[dict]:
        """Each workflow's progress; one this planner does not know (a restart without a state dir lost it) is
        reported `lost`."""
        await self._ensure_started()
        status = await self._status()
        ids = list(self.workflows) if workflow_ids is None else workflow_ids
        return [self._progress_of(w, status) if w in self.workflows else
                {"workflow": w, "stages_done": 0, "stages": 0, "running_shards": 0, "state": "lost",
                 "error": "the planner restarted without a state dir (--state-dir) and lost it"} for w in ids]

    async def adopt(self, job: str) -> list[str]:
        """Every workflow this planner knows now belongs to `job` (a `--resume` driver taking over from the jobs
        that submitted them before the service went down); returns their ids."""
        await self._ensure_started()
        self._journal(("adopt", job))
        for rec in self.workflows.values():
            rec.job = job
        return list(self.workflows)

    async def watch_job(self, job: str, token) -> None:
        """Cancel and forget the job's workflows once its `JobToken` dies (the job ended or was stopped). Drivers
        call it on every poll: a restarted planner picks the watch up again; a second call changes nothing."""
        if job not in self.watched_jobs and job not in self.gone_jobs:
            self.watched_jobs.add(job)
            self._spawn(self._watch_job(job, token))

    async def _watch_job(self, job: str, token) -> None:
        try:
            await token.hold.remote()
        except Exception:  # noqa: BLE001 -- any way the token goes means the job is gone
            pass
        self.watched_jobs.discard(job)
        self.gone_jobs.add(job)
        await self._cancel_job(job)

    async def _cancel_job(self, job: str) -> None:
        mine = [wid for wid, rec in self.workflows.items() if rec.job == job]
        for wid in mine:
            rec = self.workflows.get(wid)
            if rec is not None and rec.done is None:
                logger.info("job %s went away: cancelling workflow %s", job, wid)
                self.cancelled_workflows += 1
                await self._handle(WorkflowCancelled(wid, self._now_s()))
        await self.release(mine)  # nobody will fetch them now

    async def service_status(self) -> dict:
        """For `fate-ray status`: devices with their resident models and queues, and the workflows running."""
        status = await self._status()
        devices = [{"device": d.device_id, "alive": d.alive, "running": d.running_shards,
                    "concurrency": d.concurrency, "queued": d.queued_shards, "resident": list(d.active_models)}
                   for d in status.devices]
        workflows = [{**self._progress_of(w, status), "job": rec.job} for w, rec in self.workflows.items()]
        return {"cluster": self.cluster.name, "policy": self.policy_name, "devices": devices,
                "workflows": workflows, "model_events": dict(self.model_events),
                "cancelled_workflows": self.cancelled_workflows, "gone_jobs": sorted(self.gone_jobs)}

    async def results(self, workflow_id: str) -> dict:
        """Every request's output and the shard that produced it, per stage."""
        status = await self._status((workflow_id,))
        shards = [vars(s) for s in self.shards.values() if s.workflow_id == workflow_id and s.status == "done"]
        stages = {sid: {"outputs": dict(st.outputs), "output_tokens": dict(st.output_tokens)}
                  for sid, st in status.outputs[workflow_id].items()}
        return {"stages": stages, "shards": shards, "failed": status.workflows[workflow_id].failure_reason,
                "decisions": self.decisions.by_workflow.get(workflow_id, [])}

    async def release(self, workflow_ids: list[str]) -> None:
        """The driver has written these workflows' results: forget them here and in the Controller."""
        for wid in workflow_ids:
            rec = self.workflows.get(wid)
            if rec is None or rec.done is None:
                continue  # still running: its results are not written yet
            await self._handle(WorkflowReleased(wid, self._now_s()))
            self._forget(wid)

    def _forget(self, wid: str) -> None:
        self.workflows.pop(wid, None)
        self.decisions.take(wid)
        for shard_id in [k for k, s in self.shards.items() if s.workflow_id == wid and s.status != "running"]:
            del self.shards[shard_id]

    async def running_devices(self) -> list[str]:
        """Devices with a shard running now, earliest dispatch first."""
        running = sorted((s for s in self.shards.values() if s.status == "running"), key=lambda s: s.dispatched_s)
        return list(dict.fromkeys(s.device_id for s in running))

    async def stats(self) -> dict:
        await self._ensure_started()
        s = (await self._status()).stats
        async with self.lock:  # the calibration is the estimator's, which planning rounds update
            calibration = self.controller.estimator.calibration.report()
        return {"planning_rounds": s.planning_rounds, "shards_dispatched": s.shards_dispatched,
                "duplicate_finishes": s.duplicate_finishes, "retries": s.retries, "prefetches": s.prefetches,
                "solver_status": dict(s.solver_status), "model_events": dict(self.model_events),
                "reports": {"adopted": self.reports.adopted, "stale": self.reports.stale},
                "calibration": calibration}

    # -- the shell --------------------------------------------------------------------------------------------------
    async def _handle(self, event) -> None:
        async with self.lock:
            rounds = self.timer.rounds
            # NOTE: in a thread so a CP-SAT round never blocks the event loop that awaits worker replies.
            commands = await asyncio.to_thread(self.controller.handle, event)
            planned = self.timer.rounds > rounds
            if planned:
                self._record_round()
            self._journal(("event", event, self.timer.last_plan if planned else None))
        if isinstance(event, ShardFinished):
            self._record_finish(event)
        for cmd in commands:
            self._execute(cmd)

    # -- restart by replay (journal.py) -----------------------------------------------------------------------------
    def _journal(self, record: tuple) -> None:
        if self.journal is None:
            return
        self.journal.append(record)
        if self.journal.due():
            books = {"workflows": {w: (r.submitted_s, r.job, r.done, r.done_wall_s) for w, r in self.workflows.items()},
                     "shards": self.shards, "model_events": self.model_events}
            self.journal.snapshot((self.controller, books, self._now_s()))

    def _recover(self) -> None:
        """Rebuild the Controller and the bookkeeping from the snapshot and the journal (no policy is asked)."""
        state, records = self.journal.load()
        now_s = 0.0
        if state is not None:
            self.controller, books, now_s = state
            self.timer = self._make_timer(self.policy_name, self.controller.estimator)  # calibration carries over
            for wid, (submitted_s, job, done, done_wall_s) in books["workflows"].items():
                self.workflows[wid] = WorkflowRecord(submitted_s, job, done, done_wall_s)
                if done is not None:
                    self.workflows[wid].finished.set()
            self.shards, self.model_events = books["shards"], books["model_events"]
        replay = ReplayPolicy(self.timer.own_prefetch)
        self.controller.policy = replay
        for record in records:
            if record[0] == "workflow":
                self.workflows[record[1]] = WorkflowRecord(record[3], record[2])
            elif record[0] == "adopt":
                for rec in self.workflows.values():
                    rec.job = record[1]
            elif record[0] == "shard":
                rec = self.shards.get(record[1])
                if rec is not None:
                    rec.finished(*record[2:])
            else:
                _, event, plan = record
                if plan is not None:
                    replay.plans.append(plan)
                for cmd in self.controller.handle(event):
                    self._execute(cmd, replaying=True)
                now_s = max(now_s, event.now_s)
                if isinstance(event, WorkflowReleased) and event.workflow_id in self.workflows:
                    self._forget(event.workflow_id)
        self.controller.policy = self.timer
        self.t0 = time.monotonic() - now_s * self.time_scale  # the clock goes on from where it stopped
        self._restarted = True
        logger.warning("planner restarted from %s: %d workflows, %d journal records replayed", self.journal.dir,
                       len(self.workflows), len(records))

    async def _ensure_started(self) -> None:
        """On the first call after (re)start: the gauge task, and after a restart the shards that were in flight
        sent again (nobody awaits their old results any more)."""
        if self._gauge_task is None:
            self._gauge_task = asyncio.get_running_loop().create_task(self._refresh_gauges())
            if self.reports.interval_s:
                self._spawn(self._poll_reports())
        if self._restarted:
            self._restarted = False
            for rec in self.shards.values():
                if rec.status == "running":
                    rec.status = "lost"
            await self._handle(PlannerRestarted(self._now_s()))

    # -- metrics ----------------------------------------------------------------------------------------------------
    def _record_round(self) -> None:
        ms, frontier, status = self.timer.last
        tags = {"policy": self.policy_name}
        self.metrics.plan_latency_ms.observe(ms, tags)
        self.metrics.frontier_size.set(frontier, tags)
        self.metrics.solver_status.inc(1, {**tags, "status": status or "NONE"})

    def _record_dispatch(self, cmd: Dispatch) -> None:
        self.metrics.queue_wait_s.observe(max(0.0, self._now_s() - cmd.shard.ready_s))
        self._record_model_events(cmd.device_id, cmd.activation, cmd.evict)

    def _record_model_events(self, device_id: str, activation: str, evict: tuple[str, ...]) -> None:
        if activation in ("load", "wake"):
            self.metrics.model_events.inc(1, {"device": device_id, "kind": activation})
            self.model_events[activation] += 1
        if evict:
            self.metrics.model_events.inc(len(evict), {"device": device_id, "kind": "evict"})
            self.model_events["evict"] += len(evict)

    def _record_finish(self, event: ShardFinished) -> None:
        record = self.shards.get(event.shard_id)
        if record is None:
            return
        prompt = record.prompt_tokens
        if prompt:  # NOTE: Ray counters refuse an increment of 0
            self.metrics.prefix_query_tokens.inc(prompt, {"device": event.device_id})
        if event.cached_tokens:
            self.metrics.prefix_hit_tokens.inc(event.cached_tokens, {"device": event.device_id})
        self.metrics.shards.inc(1, {"outcome": "done"})

    async def _refresh_gauges(self) -> None:
        """Re-set gauges every 2 s: Ray forgets a gauge that is not set for ~15-20 s."""
        while True:
            for dev in (await self._status()).devices:
                busy = dev.running_shards / dev.concurrency if dev.alive else 0.0
                self.metrics.device_busy.set(busy, {"device": dev.device_id})
            self.metrics.frontier_size.set(self.timer.last[1], {"policy": self.policy_name})
            await asyncio.sleep(2.0)

    def _execute(self, cmd, replaying: bool = False) -> None:
        """Carry out a command; while replaying the journal, only the bookkeeping (the work was done before)."""
        if isinstance(cmd, Dispatch):
            self._record_dispatch(cmd)
            self.shards[cmd.shard.shard_id] = ShardRecord(
                cmd.shard.shard_id, cmd.shard.workflow_id, cmd.shard.stage_id, cmd.device_id, cmd.shard.model,
                cmd.shard.request_indices, time.time(), cmd.activation,
                prompt_tokens_per_request=cmd.shard.prompt_tokens, predicted_cached_tokens=cmd.predicted_cached_tokens)
            if not replaying:
                self.reports.sent(cmd.device_id)
                self._spawn(self._run_shard(cmd))
        elif isinstance(cmd, LoadModel):
            self._record_model_events(cmd.device_id, cmd.activation, cmd.evict)
            if not replaying:
                self.reports.sent(cmd.device_id)
                self._spawn(self._load(cmd))
        elif isinstance(cmd, StageDone):
            self.metrics.stage_latency_s.observe(max(0.0, cmd.now_s - cmd.ready_s), {"model": cmd.model})
        elif isinstance(cmd, WorkflowDone):
            rec = self.workflows[cmd.workflow_id]
            self.metrics.workflow_latency_s.observe(max(0.0, cmd.now_s - cmd.arrival_s),
                                                    {"outcome": "done" if cmd.ok else "failed"})
            rec.done = cmd
            rec.done_wall_s = time.time()
            rec.finished.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug in the shell must not pass silently: the workflows it stranded would wait forever.
            logger.error("planner task failed", exc_info=task.exception())

    async def _run_shard(self, cmd: Dispatch) -> None:
        try:
            await self._run_shard_on_worker(cmd)
        finally:
            if cmd.shard.workflow_id not in self.workflows:  # released while this shard of it still ran
                self.shards.pop(cmd.shard.shard_id, None)

    async def _run_shard_on_worker(self, cmd: Dispatch) -> None:
        record = self.shards[cmd.shard.shard_id]
        try:
            result = await self.workers[cmd.device_id].run_shard.remote(cmd)
        except RayActorError as exc:
            record.status = "lost"
            self.metrics.shards.inc(1, {"outcome": "lost"})
            await self._handle(WorkerLost(cmd.device_id, self._now_s(), f"worker died: {exc.__class__.__name__}"))
            return
        except Exception as exc:  # noqa: BLE001 -- an engine error fails the shard; the Controller decides on retry
            record.status = "failed"
            self.metrics.shards.inc(1, {"outcome": "failed"})
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the engine's own exception
            await self._handle(ShardFailed(cmd.shard.shard_id, cmd.device_id, self._now_s(),
                                           f"{cause.__class__.__name__}: {cause}".splitlines()[0]))
            return
        done = (result.started_s, result.ended_s, result.outputs, result.output_tokens, result.prompt_tokens,
                result.cached_per_request)
        record.finished(*done)
        if result.prompt_tokens:
            self.metrics.observe_drift(record.predicted_cached_tokens, record.cached_tokens)
        self._journal(("shard", record.shard_id, *done))
        await self._handle(ShardFinished(cmd.shard.shard_id, cmd.device_id, self._now_s(), result.output_tokens,
                                         result.outputs, result.phase_s, result.cached_tokens,
                                         result.output_token_ids))
        if result.report is not None:
            await self._adopt_report(cmd.device_id, result.report)

    # -- worker state reports (reports.py) ---------------------------------------------------------------------------
    async def _adopt_report(self, device_id: str, report) -> None:
        event = self.reports.event(device_id, report, self._now_s())
        if event is not None:
            await self._handle(event)

    async def _poll_reports(self) -> None:
        """Every `report_interval_s`, each worker's state: what the planner believes is replaced by it."""
        while True:
            await asyncio.sleep(self.reports.interval_s)
            for device_id, worker in list(self.workers.items()):
                try:
                    report = await worker.report.remote()
                except Exception:  # noqa: BLE001 -- a dead worker is found by the shard it runs, not here
                    continue
                await self._adopt_report(device_id, report)

    async def _load(self, cmd: LoadModel) -> None:
        try:
            await self.workers[cmd.device_id].load_model.remote(cmd)
        except RayActorError:
            await self._handle(WorkerLost(cmd.device_id, self._now_s(), "worker died while loading"))
