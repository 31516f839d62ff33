"""Discrete-event simulator: a virtual clock driving the same Controller and policies the Ray runtime runs.

Loop: pop the earliest event, hand it to `Controller.handle`, execute the returned commands against the true
performance model (sim/truth.py), which schedules each shard's finish. Ties break by insertion order, so a run is
a pure function of (cluster, workflows, policy, seed).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fate_ray.controller import Controller
from fate_ray.cost import Calibration, CostEstimator
from fate_ray.engines.modelled_device import NoiseModel, ShardOutcome
from fate_ray.events import (
    Dispatch,
    LoadModel,
    ShardFinished,
    WorkerLost,
    WorkerStateReported,
    WorkflowDone,
    WorkflowSubmitted,
)
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import PlanTimer
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.truth import TruePerformance
from fate_ray.workload import Workflow

TRACE_KEYS = ("instance", "seed", "policy", "workflow", "stage", "shard", "device", "node", "model", "arrival_s",
              "start_s", "end_s", "load_s", "prompt_tokens", "cached_tokens", "output_tokens", "parents")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    phase_sigma: float = 0.15
    output_sigma: float = 0.5
    calibrate: bool = True
    fail_devices_at_s: tuple[tuple[str, float], ...] = ()  # (device id, time): the worker dies then
    max_sim_s: float = 1e9
    # The warm regime: (device id, models ACTIVE there at t=0). The engines start with them loaded and the
    # planner learns it from each worker's first state report, as on a cluster that was already serving.
    initial_models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    truth_perturb: float = 0.0  # scale the engine model's constants by a seeded factor in [1-F, 1+F]


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
             record_trace: bool = False) -> SimResult:
    """Run `workflows` (with their arrival times) to completion under `policy`."""
    estimator = CostEstimator(cluster, Calibration(enabled=config.calibrate))
    timed = PlanTimer(make_policy(policy, PolicyContext(cluster, estimator, config.seed)))
    controller = Controller(cluster, timed, estimator)
    truth = TruePerformance(cluster, NoiseModel(config.seed, config.phase_sigma, config.output_sigma))
    result = SimResult(policy, config.seed, {w.workflow_id: w.arrival_s for w in workflows}, {}, {},
                       controller=controller, plan_ms=timed.plan_ms)
    parents = {(w.workflow_id, sid): st.parents for w in workflows for sid, st in w.stages.items()}
    seq = itertools.count()
    heap: list[tuple] = []
    for w in workflows:
        heapq.heappush(heap, (w.arrival_s, next(seq), WorkflowSubmitted(w, w.arrival_s)))
    for device_id, models in config.initial_models:
        state = truth.devices[device_id].state
        for model in models:
            state.activate(model, 0.0)
        heapq.heappush(heap, (0.0, next(seq), WorkerStateReported(device_id, 0.0, dict(state.residency), {})))
    for device_id, at_s in config.fail_devices_at_s:
        heapq.heappush(heap, (at_s, next(seq), WorkerLost(device_id, at_s, "injected failure")))
    in_flight: dict[str, tuple[Dispatch, ShardOutcome]] = {}
    started = time.perf_counter()
    while heap:
        now_s, _, event = heapq.heappop(heap)
        if now_s > config.max_sim_s:
            break
        if isinstance(event, ShardFinished):
            cmd, outcome = in_flight.pop(event.shard_id)
            if not truth.devices[event.device_id].alive:
                continue  # its worker died mid-shard: nothing comes back
            truth.finish(event.device_id, cmd.shard, outcome)
            if record_trace:
                result.trace.append(_trace_row(cmd, outcome, truth, parents))
            result.prompt_tokens += outcome.prompt_tokens
            result.cached_tokens += outcome.cached_tokens
        elif isinstance(event, WorkerLost):
            truth.kill(event.device_id)
        result.events += 1
        for cmd in controller.handle(event):
            if isinstance(cmd, Dispatch):
                outcome = truth.start(cmd, now_s)
                result.loads += outcome.activation == "load"
                result.wakes += outcome.activation == "wake"
                in_flight[cmd.shard.shard_id] = (cmd, outcome)
                phases = {"activation": outcome.activation_s, "prefill": outcome.prefill_s, "decode": outcome.decode_s}
                finished = ShardFinished(cmd.shard.shard_id, cmd.device_id, outcome.end_s, outcome.output_tokens,
                                         phase_s=phases, cached_tokens=outcome.cached_tokens)
                heapq.heappush(heap, (outcome.end_s, next(seq), finished))
            elif isinstance(cmd, LoadModel):
                kind = truth.load(cmd, now_s)
                result.loads += kind == "load"
                result.wakes += kind == "wake"
            elif isinstance(cmd, WorkflowDone):
                if cmd.ok:
                    result.completions_s[cmd.workflow_id] = cmd.now_s
                else:
                    result.failed[cmd.workflow_id] = cmd.error
    result.wall_s = time.perf_counter() - started
    return result


def _trace_row(cmd: Dispatch, outcome: ShardOutcome, truth: TruePerformance, parents) -> tuple:
    shard = cmd.shard
    return (shard.workflow_id, shard.stage_id, shard.shard_id, cmd.device_id, truth.device(cmd.device_id).node,
            shard.model, shard.arrival_s, outcome.start_s, outcome.end_s, outcome.activation_s, outcome.prompt_tokens,
            outcome.cached_tokens, sum(outcome.output_tokens), list(parents[shard.stage_key]))
