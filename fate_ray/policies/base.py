"""The policy interface: a frontier of ready stages and a cluster snapshot in, an assignment of requests out.

A policy is called by the Controller once per planning round, synchronously, with every stage whose parents are
done and whose requests are not yet placed. It must place every request of every stage it is given (deferring is
not part of this interface yet). The Controller groups a stage's requests that go to one device into one shard and
queues it there. How a device orders its queue, and the generic prefetch of the next stages' models, are Controller
settings shared by every policy (controller.py), not policy choices: a policy that brings its own prefetch sets
`own_prefetch` and must document and ablate it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.events import StageKey
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot, DeviceSnapshot, Residency, chain_blocks, matched_blocks


@dataclass(frozen=True, slots=True)
class ReadyStage:
    """A stage of the frontier: its unplaced requests, with prompts resolved to block hashes."""

    key: StageKey
    model: str
    request_indices: tuple[int, ...]
    requests: tuple[RequestShape, ...]  # output_tokens = the planner's expectation
    shardable: bool
    rank_s: float
    arrival_s: float
    input_bytes_by_node: Mapping[str, int] = field(default_factory=dict)
    dag: DagInfo | None = None  # the stage's DAG, for planners that look ahead (None in hand-built frontiers)


@dataclass(frozen=True, slots=True)
class Assignment:
    stage: StageKey
    device_id: str
    request_indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    assignments: tuple[Assignment, ...]
    solver_status: str = ""  # for planners with a solver: OPTIMAL, FEASIBLE, FALLBACK, ...
    prefetch: tuple[tuple[str, str], ...] = ()  # (model, device id): load ahead of the stages that will need it


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy is built with: the cluster, the shared estimator and a seed for its own randomness."""

    cluster: ClusterSpec
    estimator: CostEstimator
    seed: int = 0
    # True in the simulator: a policy must not let the wall clock change a decision (a solver's time limit binds
    # differently on a loaded machine), so that a run is a pure function of its seed.
    reproducible: bool = False


class PlanContractError(RuntimeError):
    """A policy returned a plan that breaks this interface's contract: a bug in the policy, not a user error."""


class Policy(ABC):
    """Base of every scheduling policy. Subclasses set `name` and implement `plan`."""

    name: ClassVar[str]
    # True: the policy's own `Plan.prefetch` replaces the Controller's generic prefetch (fate_ray/prefetch.py).
    # An instance may set it from its settings (FATE's `fate-no-prefetch` ablation: no prefetch at all).
    own_prefetch: bool = False

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.cluster = ctx.cluster
        self.estimator = ctx.estimator

    @abstractmethod
    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        """Place every request of every frontier stage on a live device that fits its model."""

    def candidate_terms(self, stage: StageKey) -> list[dict]:
        """For `fate-ray explain`: the candidate devices the last round scored for `stage`, with their terms in
        seconds (fate_ray/explain.py names them); [] for a policy that scores no candidates."""
        return []

    def candidates(self, snapshot: ClusterSnapshot, model: str) -> list[DeviceSnapshot]:
        """Live devices whose type fits `model`, in cluster order."""
        return [d for d in snapshot.devices if d.alive and self.cluster.fits(model, d.device.type)]


class PlanTimer:
    """Wraps a policy to time each round and keep its frontier size and solver status (clocks live in the shells,
    never in the Controller); `last` holds the latest (wall ms, frontier size, status)."""

    def __init__(self, policy: Policy, keep_history: bool = True, observers: Sequence = ()):
        """`keep_history=False` (a long-lived planner): count rounds, keep no per-round list. `observers` are called
        with (snapshot, frontier, plan) after each round (fate_ray/explain.py's DecisionLog)."""
        self.policy = policy
        self.observers = list(observers)
        self.keep_history = keep_history
        self.rounds = 0
        self.plan_ms: list[float] = []
        self.last: tuple[float, int, str] = (0.0, 0, "")
        self.last_plan: Plan | None = None

    def __getattr__(self, name: str):
        return getattr(self.policy, name)

    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        started = time.perf_counter()
        plan = self.policy.plan(snapshot, frontier)
        ms = (time.perf_counter() - started) * 1000
        self.rounds += 1
        if self.keep_history:
            self.plan_ms.append(ms)
        self.last = (ms, len(frontier), plan.solver_status)
        self.last_plan = plan
        for observe in self.observers:
            observe(snapshot, frontier, plan)
        return plan


class RoundLoad:
    """Per-round bookkeeping many baselines share: estimated free time, request load and the models this round has
    sent to each device, as they place work."""

    def __init__(self, snapshot: ClusterSnapshot):
        self.now_s = snapshot.now_s
        self.free_at_s = {d.device.device_id: max(d.free_at_s, snapshot.now_s) for d in snapshot.devices}
        self.requests = {d.device.device_id: d.queued_requests for d in snapshot.devices}
        self.concurrency = {d.device.device_id: d.concurrency for d in snapshot.devices}
        self.sent: set[tuple[str, str]] = set()  # (device, model) placed this round: resident by the time it runs

    def add(self, device_id: str, service_s: float, num_requests: int = 1, model: str | None = None) -> None:
        # Work spreads over the device's concurrent slots, so its backlog drains `concurrency` times faster.
        self.free_at_s[device_id] += service_s / self.concurrency[device_id]
        self.requests[device_id] += num_requests
        if model is not None:
            self.sent.add((device_id, model))

    def state_of(self, d: DeviceSnapshot, model: str) -> Residency:
        """The model's residency on d once this round's earlier placements ran: ACTIVE if one sent it there.
        (An eviction by an earlier placement of this round is not tracked.)"""
        return "ACTIVE" if (d.device.device_id, model) in self.sent else d.state_of(model)


RESIDENCY_TIER = {"ACTIVE": 0, "SLEEPING": 1, "ABSENT": 2}  # warmest first


class StatelessService:
    """Stateless service time of one request on a device type (model resident, empty cache), memoised: make one
    per round, since calibration moves the estimates between rounds."""

    def __init__(self, estimator: CostEstimator):
        self.estimator = estimator
        self._memo: dict[tuple[str, str, int, int], float] = {}

    def __call__(self, model: str, device_type: str, req: RequestShape) -> float:
        key = (model, device_type, req.prompt_tokens, req.output_tokens)
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = self.estimator.shard_cost(model, device_type, [req], None).service_s
        return value

    def with_activation(self, model: str, device_type: str, req: RequestShape, state: Residency) -> float:
        """Making the model ACTIVE from `state`, then the request's stateless service."""
        return self.estimator.activation_s(model, device_type, state) + self(model, device_type, req)


class RoutedPrefixes:
    """The prompt runs a router has sent to each (device, model) this round, on top of the device's cache (SGLang's
    router inserts a request's text into its tree when it routes it). A cache plus whole prompts' runs is
    prefix-closed, so `state.matched_blocks` may binary-search the union."""

    def __init__(self):
        self._runs: dict[tuple[str, str], set[int]] = {}
        self._blocks: dict[tuple[str, str], int] = {}  # blocks those runs add to the device's cache

    def matched_blocks(self, device_id: str, model: str, cache: Container[int], hashes: Sequence[int]) -> int:
        return matched_blocks(_Union(cache, self._runs.get((device_id, model), ())), hashes)

    def add(self, device_id: str, model: str, cache: Container[int], hashes: Sequence[int]) -> None:
        key = (device_id, model)
        held = self.matched_blocks(device_id, model, cache, hashes)
        self._blocks[key] = self._blocks.get(key, 0) + chain_blocks(hashes) - held
        self._runs.setdefault(key, set()).update(hashes)

    def blocks(self, device_id: str, model: str) -> int:
        return self._blocks.get((device_id, model), 0)


class _Union:
    __slots__ = ("first", "second")

    def __init__(self, first: Container[int], second: Container[int]):
        self.first, self.second = first, second

    def __contains__(self, block: object) -> bool:
        return block in self.first or block in self.second


def rank_order(frontier: Sequence[ReadyStage]) -> list[ReadyStage]:
    """Highest upward rank first, then the oldest workflow, then the key (deterministic)."""
    return sorted(frontier, key=lambda s: (-s.rank_s, s.arrival_s, s.key))


def group_assignments(choices: Sequence[tuple[StageKey, str, int]]) -> tuple[Assignment, ...]:
    """(stage, device, request index) choices -> one Assignment per (stage, device), in first-seen order."""
    grouped: dict[tuple[StageKey, str], list[int]] = {}
    for stage, device_id, index in choices:
        grouped.setdefault((stage, device_id), []).append(index)
    return tuple(Assignment(stage, dev, tuple(idx)) for (stage, dev), idx in grouped.items())
