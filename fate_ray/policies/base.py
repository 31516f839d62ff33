"""The policy interface: a frontier of ready stages and a cluster snapshot in, an assignment of requests out.

A policy is called by the Controller once per planning round, synchronously, with every stage whose parents are
done and whose requests are not yet placed. It must place every request of every stage it is given (deferring is
not part of this interface yet). The Controller groups a stage's requests that go to one device into one shard and
queues it there; devices run their queues in the policy's `queue_order`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.events import StageKey
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot, DeviceSnapshot

QueueOrder = Literal["fifo", "rank", "arrival"]  # arrival: oldest workflow first, then rank


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


class PlanContractError(RuntimeError):
    """A policy returned a plan that breaks this interface's contract: a bug in the policy, not a user error."""


class Policy(ABC):
    """Base of every scheduling policy. Subclasses set `name` and implement `plan`."""

    name: ClassVar[str]
    queue_order: ClassVar[QueueOrder] = "fifo"

    def __init__(self, ctx: PolicyContext):
        self.ctx = ctx
        self.cluster = ctx.cluster
        self.estimator = ctx.estimator

    @abstractmethod
    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        """Place every request of every frontier stage on a live device that fits its model."""

    def candidates(self, snapshot: ClusterSnapshot, model: str) -> list[DeviceSnapshot]:
        """Live devices whose type fits `model`, in cluster order."""
        return [d for d in snapshot.devices if d.alive and self.cluster.fits(model, d.device.type)]


class PlanTimer:
    """Wraps a policy to time each round and keep its frontier size and solver status (clocks live in the shells,
    never in the Controller); `last` holds the latest (wall ms, frontier size, status)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.plan_ms: list[float] = []
        self.last: tuple[float, int, str] = (0.0, 0, "")

    def __getattr__(self, name: str):
        return getattr(self.policy, name)

    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        started = time.perf_counter()
        plan = self.policy.plan(snapshot, frontier)
        ms = (time.perf_counter() - started) * 1000
        self.plan_ms.append(ms)
        self.last = (ms, len(frontier), plan.solver_status)
        return plan


class RoundLoad:
    """Per-round bookkeeping many baselines share: estimated free time and request load as they place work."""

    def __init__(self, snapshot: ClusterSnapshot):
        self.now_s = snapshot.now_s
        self.free_at_s = {d.device.device_id: max(d.free_at_s, snapshot.now_s) for d in snapshot.devices}
        self.requests = {d.device.device_id: d.queued_requests for d in snapshot.devices}
        self.concurrency = {d.device.device_id: d.concurrency for d in snapshot.devices}

    def add(self, device_id: str, service_s: float, num_requests: int = 1) -> None:
        # Work spreads over the device's concurrent slots, so its backlog drains `concurrency` times faster.
        self.free_at_s[device_id] += service_s / self.concurrency[device_id]
        self.requests[device_id] += num_requests


def group_assignments(choices: Sequence[tuple[StageKey, str, int]]) -> tuple[Assignment, ...]:
    """(stage, device, request index) choices -> one Assignment per (stage, device), in first-seen order."""
    grouped: dict[tuple[StageKey, str], list[int]] = {}
    for stage, device_id, index in choices:
        grouped.setdefault((stage, device_id), []).append(index)
    return tuple(Assignment(stage, dev, tuple(idx)) for (stage, dev), idx in grouped.items())
