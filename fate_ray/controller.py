"""The pure scheduling state machine shared by the simulator and the Ray runtime: events in, commands out.

    commands = controller.handle(event)

No clocks, threads or I/O: time comes in on the events. Each `handle` applies the event, runs one planning round
if the frontier changed (the policy places every ready request on a device queue, then the generic prefetch loads
the frontier's children's models ahead), then starts queued shards on devices with a free slot whose model can be
made resident (`Dispatch`). The Controller's `DeviceState`s are its belief about each device, advanced by the
commands it issues and overwritten by `WorkerStateReported`.

Two disciplines are Controller settings, the same for every policy (a benchmark compares policies, not these):
- `queue_order`: how each device's queue is ordered: `fifo` (placement order), `rank` (upward rank first, then
  oldest workflow) or `arrival` (oldest workflow first, then upward rank; the default, `DEFAULT_QUEUE_ORDER`);
- `prefetch`: after each round, `fate_ray.prefetch.generic_prefetch` (on by default). A policy whose `own_prefetch`
  is True replaces it with its own `Plan.prefetch`; with `prefetch=False` neither runs.

Invariants (checked by `validate_state`): a device runs at most `concurrency` shards; the ACTIVE models of a device
fit its memory; every request of a ready stage is exactly one of pending, queued, running or done; a request's
output is recorded once.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, get_args

from fate_ray.cost import CostEstimator, RequestShape, cached_blocks_per_request
from fate_ray.events import (
    Command,
    Dispatch,
    Event,
    LoadModel,
    PlannerRestarted,
    Shard,
    ShardFailed,
    ShardFinished,
    StageDone,
    WorkerLost,
    WorkerStateReported,
    WorkflowCancelled,
    WorkflowDone,
    WorkflowReleased,
    WorkflowSubmitted,
)
from fate_ray.policies.base import Plan, PlanContractError, Policy, ReadyStage
from fate_ray.prefetch import generic_prefetch
from fate_ray.progress import DagInfo, WorkflowRun, upward_ranks
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot, DeviceState, snapshot_device
from fate_ray.status import ControllerStats, ControllerStatus, DeviceStatus, WorkflowStatus, stage_outputs
from fate_ray.workload import Workflow, expected_prompt_tokens

QueueOrder = Literal["fifo", "rank", "arrival"]
QUEUE_ORDERS: tuple[str, ...] = get_args(QueueOrder)
# Chosen by measurement with every policy sharing each order, never per policy (BENCHMARKS.md, "Queue order").
DEFAULT_QUEUE_ORDER: QueueOrder = "arrival"
# Bumped whenever what a pickled Controller holds changes, so that an old journal's snapshot is refused in one
# sentence rather than restored with fields missing.
STATE_FORMAT = 3


@dataclass
class _Running:
    shard: Shard
    device_id: str
    end_estimate_s: float
    # NOTE: the run itself, not its id: once a finished run is released, its id may be submitted again while a
    # shard of the old run (of a failed workflow) still runs, and that shard must not feed the new run.
    run: WorkflowRun


@dataclass(frozen=True, slots=True)
class QueuedShard:
    """A shard waiting in a device's queue, with the service time estimated when it was placed there."""

    shard: Shard
    service_estimate_s: float

    @property
    def num_requests(self) -> int:
        return len(self.shard.request_indices)


def _rank_first(queued: QueuedShard) -> tuple[float, float]:
    return (-queued.shard.rank_s, queued.shard.arrival_s)


def _oldest_first(queued: QueuedShard) -> tuple[float, float]:
    return (queued.shard.arrival_s, -queued.shard.rank_s)


# Where a shard goes in its device's queue; among equal keys, placement order (bisect.insort_right). None: the back.
QUEUE_KEYS: dict[str, Callable[[QueuedShard], tuple] | None] = {"fifo": None, "rank": _rank_first,
                                                                 "arrival": _oldest_first}


@dataclass
class DeviceQueue:
    """One device as the Controller sees it: its state, the shards queued for it (kept in queue order) and the
    ones running there. The queue's totals are kept as it changes: a planning round reads them for every device,
    and summing a long queue each time dominated the simulator."""

    state: DeviceState
    concurrency: int
    alive: bool = True
    queue: list[QueuedShard] = field(default_factory=list)  # change it only through the methods below
    running: dict[str, _Running] = field(default_factory=dict)
    queued_service_s: float = 0.0
    queued_requests: int = 0

    def enqueue(self, queued: QueuedShard, key: Callable[[QueuedShard], tuple] | None) -> None:
        """Add a shard behind every shard that does not sort after it (`key` None: at the back)."""
        if key is None:
            self.queue.append(queued)
        else:
            bisect.insort_right(self.queue, queued, key=key)
        self.queued_service_s += queued.service_estimate_s
        self.queued_requests += queued.num_requests

    def take(self, pos: int) -> Shard:
        queued = self.queue.pop(pos)
        if self.queue:
            self.queued_service_s -= queued.service_estimate_s
            self.queued_requests -= queued.num_requests
        else:
            self._recount()
        return queued.shard

    def drop_workflow(self, workflow_id: str) -> None:
        if any(q.shard.workflow_id == workflow_id for q in self.queue):
            self.queue = [q for q in self.queue if q.shard.workflow_id != workflow_id]
            self._recount()

    def clear(self) -> None:
        self.queue.clear()
        self._recount()

    def _recount(self) -> None:
        # Exact again (a running float total drifts), at a cost paid only when the queue is rebuilt or empties.
        self.queued_service_s = sum(q.service_estimate_s for q in self.queue)
        self.queued_requests = sum(q.num_requests for q in self.queue)


class Controller:
    def __init__(self, cluster: ClusterSpec, policy: Policy, estimator: CostEstimator, max_attempts: int = 3,
                 queue_order: QueueOrder = DEFAULT_QUEUE_ORDER, prefetch: bool = True,
                 predict_cache_hits: bool = False):
        if queue_order not in QUEUE_ORDERS:
            raise ValueError(f"unknown queue order {queue_order!r}; known: {', '.join(QUEUE_ORDERS)}")
        self.cluster = cluster
        self.policy = policy
        self.estimator = estimator
        self.max_attempts = max_attempts
        self.queue_order: QueueOrder = queue_order
        self._queue_key = QUEUE_KEYS[queue_order]
        self.prefetch = prefetch
        # Dispatches carry the predicted prefix hits per request (the Ray planner compares them with the engines');
        # off in the simulator, whose loop has no use for them.
        self.predict_cache_hits = predict_cache_hits
        self.devices = {
            d.device_id: DeviceQueue(DeviceState.empty(cluster, d), cluster.device_types[d.type].concurrency)
            for d in cluster.devices
        }
        self.workflows: dict[str, WorkflowRun] = {}
        self.frontier: set[tuple[str, str]] = set()
        self.running: dict[str, _Running] = {}
        self.stats = ControllerStats()
        self.now_s = 0.0
        self._shard_seq = 0
        self._attempts: dict[tuple[str, str], int] = {}  # next attempt number of a stage's retried requests
        self._dags: dict[int, DagInfo] = {}  # by id(workflow.stages): instances of one DAG share that mapping
        self._dag_users: dict[int, int] = {}  # workflows not yet released, per DAG

    # -- the one entry point ----------------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Command]:
        self.now_s = max(self.now_s, event.now_s)
        out: list[Command] = []
        if isinstance(event, WorkflowSubmitted):
            self._submit(event.workflow)
        elif isinstance(event, ShardFinished):
            out += self._finished(event)
        elif isinstance(event, ShardFailed):
            out += self._failed(event)
        elif isinstance(event, WorkerLost):
            self._lost(event.device_id)
        elif isinstance(event, WorkerStateReported):
            self._reported(event)
        elif isinstance(event, WorkflowReleased):
            self._release_workflow(event.workflow_id)
        elif isinstance(event, PlannerRestarted):
            self._rerun(list(self.running.values()), count_attempt=False)
        elif isinstance(event, WorkflowCancelled):
            run = self.workflows.get(event.workflow_id)
            if run is not None and run.remaining and self._is_current(run):
                out += self._fail_workflow(run, event.reason)
        else:
            raise TypeError(f"unknown event {type(event).__name__}")
        if self.frontier:
            out += self._plan_round()
        out += self._start_shards()
        return out

    # -- snapshots (the planner's journal) --------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # The shell supplies a fresh policy on restore.
        return {**self.__dict__, "policy": None, "_state_format": STATE_FORMAT}

    def __setstate__(self, state: dict) -> None:
        if state.pop("_state_format", None) != STATE_FORMAT:
            raise ValueError(f"a Controller snapshot of another format (this version reads {STATE_FORMAT})")
        self.__dict__.update(state)
        # DAGs are keyed by the id of their stages mapping, and ids change across a pickle: key them again.
        self._dags, self._dag_users = {}, {}
        for run in self.workflows.values():
            key = id(run.workflow.stages)
            self._dags[key] = run.dag
            self._dag_users[key] = self._dag_users.get(key, 0) + 1

    # -- events ---------------------------------------------------------------------------------------------------
    def _submit(self, workflow: Workflow) -> None:
        if workflow.workflow_id in self.workflows:
            raise ValueError(f"workflow id {workflow.workflow_id!r} was already submitted; give each run its own id")
        dag = self._dags.get(id(workflow.stages))
        if dag is None:
            prompts = expected_prompt_tokens(workflow)
            dag = DagInfo(workflow.stages, workflow.children(), prompts, self._upward_ranks(workflow, prompts))
            self._dags[id(workflow.stages)] = dag
        self._dag_users[id(workflow.stages)] = self._dag_users.get(id(workflow.stages), 0) + 1
        run = WorkflowRun(workflow, dag, self.cluster.block_tokens)
        self.workflows[workflow.workflow_id] = run
        for sid in run.initially_ready():
            self._make_ready(run, sid)

    def _make_ready(self, run: WorkflowRun, stage_id: str) -> None:
        run.make_ready(stage_id, self.now_s)
        self.frontier.add((run.workflow_id, stage_id))

    def _finished(self, ev: ShardFinished) -> list[Command]:
        running = self.running.pop(ev.shard_id, None)
        if running is None or running.device_id != ev.device_id:
            self.stats.duplicate_finishes += 1  # a shard we already gave up on (its worker was presumed dead)
            if running is not None:
                self.running[ev.shard_id] = running
            return []
        shard = running.shard
        dev = self.devices[ev.device_id]
        del dev.running[ev.shard_id]
        dev.state.shard_ended(shard.model, ev.now_s)
        run = running.run
        if not self._is_current(run):
            return []
        node = dev.state.device.node
        for pos, index in enumerate(shard.request_indices):
            text = ev.outputs[pos] if pos < len(ev.outputs) else ""
            ids = ev.output_token_ids[pos] if pos < len(ev.output_token_ids) else ()
            if run.record(shard.stage_id, index, ev.output_tokens[pos], text, ev.device_id, node, ids):
                dev.state.insert_blocks(shard.model, run.full_hashes(shard.stage_id, index))
        if ev.phase_s:
            self.estimator.observe_shard(shard.model, dev.state.device.type, sum(shard.prompt_tokens),
                                         ev.cached_tokens, ev.output_tokens, ev.phase_s)
        return self._maybe_complete(run, shard.stage_id)

    def _maybe_complete(self, run: WorkflowRun, stage_id: str) -> list[Command]:
        stage = run.stages[stage_id]
        if not stage.done:
            return []
        out: list[Command] = [StageDone(run.workflow_id, stage_id, stage.stage.model, stage.ready_s, self.now_s)]
        for child in run.complete(stage_id):
            self._make_ready(run, child)
        if run.remaining == 0:
            out.append(WorkflowDone(run.workflow_id, self.now_s, ok=True, arrival_s=run.workflow.arrival_s))
        return out

    def _failed(self, ev: ShardFailed) -> list[Command]:
        running = self.running.get(ev.shard_id)
        if running is None or running.device_id != ev.device_id:
            return []
        self._release(running)
        shard, run = running.shard, running.run
        if not self._is_current(run):
            return []
        if ev.retryable and shard.attempt < self.max_attempts:
            self._requeue(shard, run)
            return []
        return self._fail_workflow(run, f"stage {shard.stage_id!r} failed after {shard.attempt} attempt(s): "
                                        f"{ev.reason}")

    def _fail_workflow(self, run: WorkflowRun, reason: str) -> list[Command]:
        run.failure_reason = reason
        for dev in self.devices.values():
            dev.drop_workflow(run.workflow_id)
        self.frontier = {k for k in self.frontier if k[0] != run.workflow_id}
        return [WorkflowDone(run.workflow_id, self.now_s, ok=False, error=reason, arrival_s=run.workflow.arrival_s)]

    def _lost(self, device_id: str) -> None:
        dev = self.devices[device_id]
        dev.alive = False
        self._rerun(list(dev.running.values()), count_attempt=True)
        for queued in dev.queue:  # queued shards always belong to their id's current run
            self._requeue(queued.shard, self.workflows[queued.shard.workflow_id], count_attempt=False)
        dev.clear()
        dev.state = DeviceState.empty(self.cluster, dev.state.device)

    def _rerun(self, shards: list[_Running], count_attempt: bool) -> None:
        """Take running shards off their devices and put their requests back on the frontier."""
        for running in shards:
            self._release(running)
            self._requeue(running.shard, running.run, count_attempt)

    def _release(self, running: _Running) -> None:
        self.running.pop(running.shard.shard_id, None)
        dev = self.devices[running.device_id]
        if dev.running.pop(running.shard.shard_id, None) is not None:
            dev.state.shard_ended(running.shard.model, self.now_s)

    def _is_current(self, run: WorkflowRun) -> bool:
        """The run is still running and still the one its id names (not failed, not released)."""
        return not run.failed and self.workflows.get(run.workflow_id) is run

    def _requeue(self, shard: Shard, run: WorkflowRun, count_attempt: bool = True) -> None:
        """Put a shard's requests back on the frontier (a retry, or its device went away)."""
        if not self._is_current(run):
            return
        stage = run.stages[shard.stage_id]
        stage.pending.update(i for i in shard.request_indices if i not in stage.output_tokens)
        if count_attempt:
            self.stats.retries += 1
            self._attempts[shard.stage_key] = max(self._attempts.get(shard.stage_key, 1), shard.attempt + 1)
        self.frontier.add(shard.stage_key)

    def _reported(self, ev: WorkerStateReported) -> None:
        dev = self.devices[ev.device_id]
        dev.state.replace(ev.residency, ev.blocks, ev.removed)

    def _release_workflow(self, workflow_id: str) -> None:
        """Forget a finished workflow, and its DAG once no other workflow uses it. Shards of a failed workflow
        still running are dropped when they end (their workflow is gone)."""
        run = self.workflows.get(workflow_id)
        if run is None or (run.remaining and not run.failed):
            return  # unknown, or still running: nothing is ever lost by a release that comes too early
        del self.workflows[workflow_id]
        for sid in run.stages:
            self._attempts.pop((workflow_id, sid), None)
        dag_id = id(run.workflow.stages)
        self._dag_users[dag_id] -= 1
        if not self._dag_users[dag_id]:
            del self._dag_users[dag_id]
            del self._dags[dag_id]

    # -- the one read method for shells ------------------------------------------------------------------------------
    def status(self, outputs_of: Collection[str] = ()) -> ControllerStatus:
        """A frozen picture of the Controller for shells that run `handle` in another thread: take it under the
        same lock as `handle`. `outputs_of`: workflows whose recorded outputs to include."""
        workflows = {wid: WorkflowStatus(wid, len(run.stages) - run.remaining, len(run.stages), run.remaining == 0,
                                         run.failure_reason)
                     for wid, run in self.workflows.items()}
        devices = tuple(DeviceStatus(device_id, dev.alive, len(dev.running), dev.concurrency, len(dev.queue),
                                     tuple(sorted(m for m, r in dev.state.residency.items() if r == "ACTIVE")))
                        for device_id, dev in self.devices.items())
        outputs = {wid: stage_outputs(self.workflows[wid]) for wid in outputs_of if wid in self.workflows}
        return ControllerStatus(self.now_s, MappingProxyType(workflows), devices, MappingProxyType(outputs),
                                replace(self.stats, solver_status=dict(self.stats.solver_status)))

    # -- planning ---------------------------------------------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(self.now_s, tuple(self._device_snapshot(dev) for dev in self.devices.values()))

    def _device_snapshot(self, dev: DeviceQueue):
        backlog_s = dev.queued_service_s
        requests = dev.queued_requests
        running_tokens: dict[str, int] = {}  # KV the running requests hold at their end: prompt + expected output
        for r in dev.running.values():
            backlog_s += max(0.0, r.end_estimate_s - self.now_s)
            requests += len(r.shard.request_indices)
            shard = r.shard
            tokens = sum(shard.prompt_tokens) + shard.expected_output_tokens * len(shard.request_indices)
            running_tokens[shard.model] = running_tokens.get(shard.model, 0) + tokens
        return snapshot_device(dev.state, dev.concurrency, dev.alive, self.now_s + backlog_s / dev.concurrency,
                               len(dev.running), requests, running_tokens)

    def ready_stages(self) -> list[ReadyStage]:
        out = []
        for wid, sid in sorted(self.frontier):
            run = self.workflows[wid]
            stage = run.stages[sid]
            idx = tuple(sorted(stage.pending))
            if not idx:
                continue
            exp = stage.stage.expected_output_tokens
            reqs = tuple(RequestShape(sum(s.tokens for s in stage.prompts[i]), stage.hashes[i], exp) for i in idx)
            out.append(ReadyStage((wid, sid), stage.stage.model, idx, reqs, stage.stage.shardable, stage.rank_s,
                                  run.workflow.arrival_s, run.input_bytes_by_node(sid), run.dag))
        return out

    def _plan_round(self) -> list[Command]:
        frontier, out = [], []
        for ready in self.ready_stages():
            if any(d.alive and self.cluster.fits(ready.model, d.state.device.type) for d in self.devices.values()):
                frontier.append(ready)
            elif not self.workflows[ready.key[0]].failed:
                out += self._fail_workflow(self.workflows[ready.key[0]], f"stage {ready.key[1]!r} needs model "
                                           f"{ready.model!r} but no live device fits it")
        self.frontier.clear()
        frontier = [f for f in frontier if not self.workflows[f.key[0]].failed]
        if not frontier:
            return out
        snapshot = self.snapshot()
        plan = self.policy.plan(snapshot, frontier)
        self.stats.planning_rounds += 1
        if plan.solver_status:
            self.stats.solver_status[plan.solver_status] = self.stats.solver_status.get(plan.solver_status, 0) + 1
        self._enqueue(plan, {f.key: f for f in frontier}, snapshot)
        if not self.prefetch:
            return out
        if self.policy.own_prefetch:
            return out + self._prefetch(plan.prefetch)
        placed_on = {a.device_id for a in plan.assignments}
        loads = generic_prefetch(snapshot, frontier, placed_on, self.cluster, self.estimator)
        return out + self._prefetch(plan.prefetch + loads)

    def _prefetch(self, requests: tuple[tuple[str, str], ...]) -> list[Command]:
        """Start the loads asked for (the generic prefetch's, or a policy's own), where the device is alive, fits the
        model and has the memory; a model already ACTIVE there is skipped."""
        out: list[Command] = []
        for model, device_id in requests:
            dev = self.devices.get(device_id)
            if dev is None or not dev.alive or not self.cluster.fits(model, dev.state.device.type):
                continue
            act = dev.state.plan_activation(model)
            if act.kind == "resident" or not act.feasible:
                continue
            dev.state.activate(model, self.now_s, act.evict)
            self.stats.prefetches += 1
            out.append(LoadModel(device_id, model, act.evict, act.kind, self.now_s))
        return out

    def _enqueue(self, plan: Plan, frontier: dict, snapshot: ClusterSnapshot) -> None:
        placed: dict[tuple[str, str], set[int]] = {}
        for a in plan.assignments:
            ready = frontier.get(a.stage)
            dev = self.devices.get(a.device_id)
            if ready is None or dev is None or not dev.alive or not self.cluster.fits(ready.model, dev.state.device.type):
                raise PlanContractError(f"policy {self.policy.name!r} placed {a.stage} on {a.device_id!r}, which is "
                                        "not a live device that fits its model")
            run = self.workflows[a.stage[0]]
            stage = run.stages[a.stage[1]]
            indices = tuple(i for i in a.request_indices if i in stage.pending)
            if not indices:
                continue
            stage.pending.difference_update(indices)
            placed.setdefault(a.stage, set()).update(indices)
            shard = self._make_shard(run, a.stage[1], indices)
            est = self.estimator.shard_cost(shard.model, dev.state.device.type, shard.request_shapes(),
                                            snapshot.device(a.device_id))
            dev.enqueue(QueuedShard(shard, est.service_s), self._queue_key)
        for key, ready in frontier.items():
            missing = set(ready.request_indices) - placed.get(key, set())
            if missing:
                raise PlanContractError(f"policy {self.policy.name!r} left {len(missing)} request(s) of {key} "
                                        "unplaced")

    def _make_shard(self, run: WorkflowRun, stage_id: str, indices: tuple[int, ...]) -> Shard:
        self._shard_seq += 1
        stage = run.stages[stage_id]
        key = (run.workflow_id, stage_id)
        return Shard(
            shard_id=f"{run.workflow_id}/{stage_id}/{self._shard_seq}", workflow_id=run.workflow_id,
            stage_id=stage_id, model=stage.stage.model, request_indices=indices,
            prompts=tuple(stage.prompts[i] for i in indices), block_hashes=tuple(stage.hashes[i] for i in indices),
            expected_output_tokens=stage.stage.expected_output_tokens, max_tokens=stage.stage.max_tokens,
            rank_s=stage.rank_s, arrival_s=run.workflow.arrival_s, attempt=self._attempts.get(key, 1),
            ready_s=stage.ready_s,
        )

    # -- dispatch ---------------------------------------------------------------------------------------------------
    def _start_shards(self) -> list[Command]:
        out: list[Command] = []
        for device_id, dev in self.devices.items():
            while dev.alive and dev.queue and len(dev.running) < dev.concurrency:
                pick = self._next_startable(dev)
                if pick is None:
                    break
                out.append(self._dispatch(device_id, dev, dev.take(pick)))
        return out

    def _next_startable(self, dev: DeviceQueue) -> int | None:
        """The queue head if its model can be made resident now, else the first shard whose model already is.

        NOTE: skipping ahead only to resident models keeps the device busy while the head waits for memory held
        by busy models. It can starve the head while shards of a resident model keep arriving, each before the last
        one ends (a known gap, pinned by an xfail test in tests/test_controller.py).
        """
        head = dev.queue[0].shard
        if dev.state.plan_activation(head.model).feasible:
            return 0
        for i, queued in enumerate(dev.queue):
            if dev.state.state_of(queued.shard.model) == "ACTIVE":
                return i
        return None

    def _dispatch(self, device_id: str, dev: DeviceQueue, shard: Shard) -> Dispatch:
        act = dev.state.plan_activation(shard.model)
        others = len(dev.running)
        other_requests = sum(len(r.shard.request_indices) for r in dev.running.values())
        est = self.estimator.shard_cost(shard.model, dev.state.device.type, shard.request_shapes(), dev.state,
                                        other_shards=others, other_requests=other_requests)
        dev.state.activate(shard.model, self.now_s, act.evict)
        predicted = self._predicted_cached_tokens(dev, shard) if self.predict_cache_hits else ()
        dev.state.shard_started(shard.model)
        running = _Running(shard, device_id, self.now_s + est.service_s, self.workflows[shard.workflow_id])
        dev.running[shard.shard_id] = running
        self.running[shard.shard_id] = running
        self.stats.shards_dispatched += 1
        return Dispatch(shard, device_id, act.evict, act.kind, est.service_s, predicted)

    def _predicted_cached_tokens(self, dev: DeviceQueue, shard: Shard) -> tuple[int, ...]:
        """Per request: the prompt tokens this Controller believes the device will serve from its prefix cache."""
        computing = {h for r in dev.running.values() if r.shard.model == shard.model
                     for chain in r.shard.block_hashes for h in chain}
        blocks = cached_blocks_per_request(dev.state.caches.get(shard.model), shard.block_hashes, computing)
        return tuple(b * self.cluster.block_tokens for b in blocks)

    # -- derived quantities -----------------------------------------------------------------------------------------
    def _upward_ranks(self, workflow: Workflow, prompt_tokens: dict[str, list[int]]) -> dict[str, float]:
        """Longest estimated path from each stage to a sink, with expected token counts and no state."""
        def cost_s(sid: str) -> float:
            st = workflow.stages[sid]
            reqs = [RequestShape(tokens, (), st.expected_output_tokens) for tokens in prompt_tokens[sid]]
            return self.estimator.best_service_s(st.model, reqs)

        return upward_ranks(workflow.children(), cost_s)

    def validate_state(self) -> None:
        """Raise AssertionError if an invariant does not hold (tests call this after every run)."""
        for device_id, dev in self.devices.items():
            assert len(dev.running) <= dev.concurrency, f"{device_id} runs more shards than its concurrency"
            assert dev.state.used_gib() <= dev.state.memory_gib + 1e-6, f"{device_id} holds more models than fit"
            assert dev.queued_requests == sum(q.num_requests for q in dev.queue), f"{device_id} miscounts its queue"
            service_s = sum(q.service_estimate_s for q in dev.queue)
            assert abs(dev.queued_service_s - service_s) <= 1e-6 * max(1.0, service_s), f"{device_id} queue total drifted"
            if self._queue_key is not None:
                keys = [self._queue_key(q) for q in dev.queue]
                assert keys == sorted(keys), f"{device_id}'s queue is out of {self.queue_order} order"
        queued = {(q.shard.workflow_id, q.shard.stage_id, i) for d in self.devices.values() for q in d.queue
                  for i in q.shard.request_indices}
        running = {(r.shard.workflow_id, r.shard.stage_id, i) for r in self.running.values()
                   for i in r.shard.request_indices}
        for wid, run in self.workflows.items():
            if run.failed:
                continue
            for sid, stage in run.stages.items():
                if not stage.prompts:
                    continue
                for i in range(stage.stage.num_requests):
                    where = [i in stage.pending, (wid, sid, i) in queued, (wid, sid, i) in running,
                             i in stage.output_tokens]
                    assert sum(where) == 1, f"{wid}/{sid} request {i} is in {sum(where)} states"

    @property
    def unfinished(self) -> list[str]:
        return [wid for wid, run in self.workflows.items() if run.remaining and not run.failed]

