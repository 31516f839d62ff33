"""Discrete-event simulator: a virtual clock driving the same Controller and policies the Ray runtime runs.

Loop: pop the earliest event (a workflow arriving, a worker's state report, a device's engine model reaching its
next internal event), hand what it causes to `Controller.handle`, and execute the returned commands on the engine
models (fate_ray/engines/engine_model.py: the truth, independent of the planner's estimator), which say when each
shard finishes. The planner hears of a device only through the events of its own commands (shards finishing)
and the workers' periodic reports (blocks evicted under KV pressure). Ties break by insertion order, so a run is a
pure function of (cluster, workflows, policy, seed).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from fate_ray.controller import DEFAULT_QUEUE_ORDER, Controller, QueueOrder
from fate_ray.cost import Calibration, CostEstimator
from fate_ray.engines.engine_model import ModelledEngine, ShardOutcome
from fate_ray.engines.physics import OUTPUT_SIGMA, Draws
from fate_ray.events import (
    Dispatch,
    LoadModel,
    Shard,
    ShardFinished,
    WorkerLost,
    WorkerStateReported,
    WorkflowDone,
    WorkflowSubmitted,
)
from fate_ray.explain import DecisionLog
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import PlanTimer
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import Workflow

TRACE_KEYS = ("instance", "seed", "policy", "workflow", "stage", "shard", "device", "node", "model", "arrival_s",
              "start_s", "end_s", "load_s", "prompt_tokens", "cached_tokens", "output_tokens", "parents")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    output_sigma: float = OUTPUT_SIGMA  # true output lengths around the stage's expected length
    load_noise: bool = True  # draw load and wake times (False: their catalog figures, for deterministic tests)
    report_interval_s: float = 1.0  # workers report state (KV evictions) this often
    calibrate: bool = True
    fail_devices_at_s: tuple[tuple[str, float], ...] = ()  # (device id, time): the worker dies then
    max_sim_s: float = 1e9
    # The warm regime: (device id, models ACTIVE there at t=0). The engines start with them loaded and the
    # planner learns it from each worker's first state report, as on a cluster that was already serving.
    initial_models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    truth_perturb: float = 0.0  # scale the engine model's constants by a seeded factor in [1-F, 1+F]
    queue_order: QueueOrder = DEFAULT_QUEUE_ORDER  # the Controller's device-queue order, the same for every policy
    prefetch: bool = True  # the Controller's generic prefetch (a policy with `own_prefetch` replaces it)

    def __post_init__(self) -> None:
        if not 0 <= self.truth_perturb < 1:
            raise ValueError(f"truth_perturb (--truth-perturb) must be in [0, 1), not {self.truth_perturb}")

    def draws(self) -> Draws:
        """The engine model's random draws for this run (the lower bound replays the same ones)."""
        return Draws(self.seed, self.output_sigma, self.load_noise)


@dataclass
class SimResult:
    policy: str
    seed: int
    arrivals_s: dict[str, float]
    completions_s: dict[str, float]
    failed: dict[str, str]
    trace: list[tuple] = field(default_factory=list)  # TRACE_KEYS order, without instance/seed/policy
    prompt_tokens: int = 0
    cached_tokens: int = 0
    loads: int = 0
    wakes: int = 0
    events: int = 0
    wall_s: float = 0.0
    controller_s: float = 0.0  # of wall_s, inside Controller.handle (the policy's planning rounds included)
    controller: Controller | None = None
    plan_ms: list[float] = field(default_factory=list)

    @property
    def latencies_s(self) -> list[float]:
        return [self.completions_s[w] - self.arrivals_s[w] for w in self.completions_s]

    @property
    def makespan_s(self) -> float:
        if not self.completions_s:
            return 0.0
        return max(self.completions_s.values()) - min(self.arrivals_s.values())

    @property
    def p95_s(self) -> float:
        return percentile(self.latencies_s, 95)

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    def trace_rows(self, instance: str = "") -> list[dict]:
        return [dict(zip(TRACE_KEYS, (instance, self.seed, self.policy) + row)) for row in self.trace]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def simulate(cluster: ClusterSpec, workflows: Sequence[Workflow], policy: str, config: SimConfig = SimConfig(),
             record_trace: bool = False, decisions: list[dict] | None = None) -> SimResult:
    """Run `workflows` (with their arrival times) to completion under `policy`; `decisions`: a list to append
    every placement's decision record to (fate_ray/explain.py)."""
    estimator = CostEstimator(cluster, Calibration(enabled=config.calibrate))
    planner = make_policy(policy, PolicyContext(cluster, estimator, config.seed, reproducible=True))
    log = DecisionLog(planner, every=decisions) if decisions is not None else None
    timed = PlanTimer(planner, observers=[log] if log else ())
    controller = Controller(cluster, timed, estimator, queue_order=config.queue_order, prefetch=config.prefetch)
    draws = config.draws()
    page_caches: dict[str, set[str]] = {node.name: set() for node in cluster.nodes}
    engines = {d.device_id: ModelledEngine(cluster, d, draws, config.truth_perturb, page_caches[d.node])
               for d in cluster.devices}
    result = SimResult(policy, config.seed, {w.workflow_id: w.arrival_s for w in workflows}, {}, {},
                       controller=controller, plan_ms=timed.plan_ms)
    loop = _Loop(controller, engines, config, result, record_trace, workflows)
    started = time.perf_counter()
    loop.run()
    result.wall_s = time.perf_counter() - started
    result.loads = sum(e.loads for e in engines.values())
    result.wakes = sum(e.wakes for e in engines.values())
    return result


@dataclass(frozen=True, slots=True)
class _Wake:
    """A device's engine model has its next internal event now (stale unless `version` is still current)."""

    device_id: str
    version: int


@dataclass(frozen=True, slots=True)
class _ReportTick:
    pass


class _Loop:
    """The event loop: external events and device wake-ups on one heap; what they cause at one instant is handled
    in order through a FIFO before time moves on."""

    def __init__(self, controller: Controller, engines: dict[str, ModelledEngine], config: SimConfig,
                 result: SimResult, record_trace: bool, workflows: Sequence[Workflow]):
        self.controller, self.engines, self.config, self.result = controller, engines, config, result
        self.record_trace = record_trace
        self.parents = ({(w.workflow_id, sid): st.parents for w in workflows for sid, st in w.stages.items()}
                        if record_trace else {})
        self.seq = itertools.count()
        self.heap: list[tuple] = []
        self.todo: deque = deque()
        self.touched: set[str] = set()
        self.scheduled: dict[str, tuple[float, int]] = {}
        self.open_workflows = len(workflows)
        for w in workflows:
            self.push(w.arrival_s, WorkflowSubmitted(w, w.arrival_s))
        for device_id, models in config.initial_models:
            for model in models:
                engines[device_id].preload(model)
            self.push(0.0, WorkerStateReported(device_id, 0.0, engines[device_id].residency(), {}))
        for device_id, at_s in config.fail_devices_at_s:
            self.push(at_s, WorkerLost(device_id, at_s, "injected failure"))
        if config.report_interval_s > 0:
            self.push(config.report_interval_s, _ReportTick())

    def push(self, at_s: float, event) -> None:
        heapq.heappush(self.heap, (at_s, next(self.seq), event))

    def run(self) -> None:
        while self.heap:
            now_s, _, event = heapq.heappop(self.heap)
            if now_s > self.config.max_sim_s:
                break
            if isinstance(event, _Wake):
                engine = self.engines[event.device_id]
                if self.scheduled.get(event.device_id) != (now_s, event.version) or not engine.alive:
                    continue
                del self.scheduled[event.device_id]
                self._finished(event.device_id, engine.advance(now_s))
                self.touched.add(event.device_id)
            elif isinstance(event, _ReportTick):
                self._report(now_s)
            else:
                if isinstance(event, WorkerLost):
                    self.engines[event.device_id].kill()
                self.todo.append(event)
            while self.todo:
                self._handle(self.todo.popleft(), now_s)
            for device_id in self.touched:
                self._schedule(device_id)
            self.touched.clear()

    def _handle(self, event, now_s: float) -> None:
        self.result.events += 1
        started = time.perf_counter()
        commands = self.controller.handle(event)
        self.result.controller_s += time.perf_counter() - started
        for cmd in commands:
            if isinstance(cmd, (Dispatch, LoadModel)):
                engine = self.engines[cmd.device_id]
                done = engine.submit(cmd, now_s) if isinstance(cmd, Dispatch) else engine.load(cmd, now_s)[1]
                self._finished(cmd.device_id, done)
                self.touched.add(cmd.device_id)
            elif isinstance(cmd, WorkflowDone):
                self.open_workflows -= 1
                if cmd.ok:
                    self.result.completions_s[cmd.workflow_id] = cmd.now_s
                else:
                    self.result.failed[cmd.workflow_id] = cmd.error

    def _finished(self, device_id: str, done: list[tuple[Shard, ShardOutcome]]) -> None:
        for shard, outcome in done:
            if self.record_trace:
                self.result.trace.append(self._trace_row(device_id, shard, outcome))
            self.result.prompt_tokens += outcome.prompt_tokens
            self.result.cached_tokens += outcome.cached_tokens
            phases = {"activation": outcome.activation_s, "prefill": outcome.prefill_s, "decode": outcome.decode_s}
            self.todo.append(ShardFinished(shard.shard_id, device_id, outcome.end_s, outcome.output_tokens,
                                           phase_s=phases, cached_tokens=outcome.cached_tokens))

    def _schedule(self, device_id: str) -> None:
        engine = self.engines[device_id]
        at_s = engine.next_event_s() if engine.alive else math.inf
        if at_s == math.inf:
            self.scheduled.pop(device_id, None)
            return
        key = (at_s, engine.version)
        if self.scheduled.get(device_id) != key:
            self.scheduled[device_id] = key
            self.push(at_s, _Wake(device_id, engine.version))

    def _report(self, now_s: float) -> None:
        """Every `report_interval_s` each worker reports what its engines evicted since its last report: the
        planner learns of evictions under KV pressure only this way."""
        for device_id, engine in self.engines.items():
            if not engine.alive:
                continue
            removed = engine.take_evicted()
            if removed:
                self.todo.append(WorkerStateReported(device_id, now_s, engine.residency(), None, removed))
        if self.open_workflows > 0:
            self.push(now_s + self.config.report_interval_s, _ReportTick())

    def _trace_row(self, device_id: str, shard: Shard, outcome: ShardOutcome) -> tuple:
        node = self.engines[device_id].state.device.node
        return (shard.workflow_id, shard.stage_id, shard.shard_id, device_id, node, shard.model, shard.arrival_s,
                outcome.start_s, outcome.end_s, outcome.activation_s, outcome.prompt_tokens, outcome.cached_tokens,
                sum(outcome.output_tokens), list(self.parents[shard.stage_key]))
