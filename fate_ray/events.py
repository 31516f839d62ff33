"""Events into the Controller and commands out of it: small frozen records that cross every boundary.

Times are seconds on the caller's clock (virtual in the simulator, wall clock in the Ray runtime).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fate_ray.state import Activation, Residency
from fate_ray.workload import RequestShape, Segment, Workflow

StageKey = tuple[str, str]  # (workflow_id, stage_id)


@dataclass(frozen=True, slots=True)
class Shard:
    """Some requests of one stage, run as one batch on one device."""

    shard_id: str
    workflow_id: str
    stage_id: str
    model: str
    request_indices: tuple[int, ...]
    prompts: tuple[tuple[Segment, ...], ...]  # resolved prompt segments, one per request
    block_hashes: tuple[tuple[int, ...], ...]  # full-block hashes of each prompt
    expected_output_tokens: int
    max_tokens: int
    rank_s: float  # upward rank: the longest remaining path from this stage, estimated
    arrival_s: float  # of its workflow
    attempt: int = 1
    ready_s: float = 0.0  # when the stage became ready (Controller clock): queue wait = dispatch - ready_s
    # NOTE: counted once here, because planning rounds read every queued shard's prompt sizes.
    prompt_tokens: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_tokens", tuple(sum(s.tokens for s in p) for p in self.prompts))

    @property
    def stage_key(self) -> StageKey:
        return (self.workflow_id, self.stage_id)

    def request_shapes(self, output_tokens: Sequence[int] | None = None) -> list[RequestShape]:
        """The requests as the estimator sees them: expected output lengths unless true ones are given."""
        outs = output_tokens or [self.expected_output_tokens] * len(self.prompts)
        return [RequestShape(t, h, o) for t, h, o in zip(self.prompt_tokens, self.block_hashes, outs)]


# -- events ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkflowSubmitted:
    workflow: Workflow
    now_s: float


@dataclass(frozen=True, slots=True)
class ShardFinished:
    shard_id: str
    device_id: str
    now_s: float
    output_tokens: tuple[int, ...]  # per request, in the shard's order
    outputs: tuple[str, ...] = ()  # text, from real engines
    phase_s: Mapping[str, float] = field(default_factory=dict)  # measured: activation, prefill, decode
    cached_tokens: int = 0
    output_token_ids: tuple[tuple[int, ...], ...] = ()  # per request, from real engines: children reuse them


@dataclass(frozen=True, slots=True)
class ShardFailed:
    shard_id: str
    device_id: str
    now_s: float
    reason: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class WorkerStateReported:
    """A worker's view of its device: residency, and either every cached block (`blocks`, replacing the
    planner's belief) or the blocks its engines evicted since its last report (`removed`)."""

    device_id: str
    now_s: float
    residency: Mapping[str, Residency]
    blocks: Mapping[str, tuple[int, ...]] | None = None  # model -> cached block hashes; None: unchanged
    removed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # model -> blocks evicted since


@dataclass(frozen=True, slots=True)
class WorkerLost:
    device_id: str
    now_s: float
    reason: str = "worker died"


@dataclass(frozen=True, slots=True)
class WorkflowReleased:
    """The shell has written a finished workflow's results: the Controller may forget it (bounded memory)."""

    workflow_id: str
    now_s: float


@dataclass(frozen=True, slots=True)
class WorkflowCancelled:
    """The job that submitted a workflow went away (`ray job stop`, or its driver died): drop its queued work.
    Shards already running finish and are dropped; a finished workflow is unaffected."""

    workflow_id: str
    now_s: float
    reason: str = "cancelled: its job stopped"


@dataclass(frozen=True, slots=True)
class PlannerRestarted:
    """The planner came back from its journal: the shards it had dispatched have no caller waiting for them any
    more, so their requests go back on the frontier (no attempt counted) and run again."""

    now_s: float


Event = (WorkflowSubmitted | ShardFinished | ShardFailed | WorkerStateReported | WorkerLost | WorkflowReleased
         | WorkflowCancelled | PlannerRestarted)


# -- commands ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start `shard` on `device_id` now, after evicting `evict`; `activation` is what the model needs first."""

    shard: Shard
    device_id: str
    evict: tuple[str, ...]
    activation: Activation
    estimated_s: float
    predicted_cached_tokens: tuple[int, ...] = ()  # per request: the prompt tokens the planner believes cached


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Make `model` ACTIVE on `device_id` ahead of the shards that will need it (a planner's prefetch)."""

    device_id: str
    model: str
    evict: tuple[str, ...]
    activation: Activation
    now_s: float


@dataclass(frozen=True, slots=True)
class StageDone:
    """Every request of a stage has its output (for the shell's metrics; nothing to execute)."""

    workflow_id: str
    stage_id: str
    model: str
    ready_s: float
    now_s: float


@dataclass(frozen=True, slots=True)
class WorkflowDone:
    workflow_id: str
    now_s: float
    ok: bool
    error: str = ""
    arrival_s: float = 0.0


Command = Dispatch | LoadModel | StageDone | WorkflowDone
