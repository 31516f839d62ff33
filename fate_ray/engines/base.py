"""The Engine protocol: what a GPU worker actor needs from whatever runs the model on its device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fate_ray.events import Dispatch, LoadModel
from fate_ray.state import Residency


@dataclass(frozen=True, slots=True)
class EngineReport:
    """A device's state as the engine sees it (the planner adopts it as truth)."""

    residency: dict[str, Residency]
    blocks: dict[str, tuple[int, ...]]
    used_gib: float
    commands_seen: int = 0  # Dispatch and LoadModel calls received: a report older than a command sent is stale


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What an engine returns for a shard: per request, in the shard's order."""

    output_tokens: tuple[int, ...]
    outputs: tuple[str, ...]
    phase_s: dict[str, float] = field(default_factory=dict)  # measured activation, queue, prefill, decode
    cached_tokens: int = 0
    started_s: float = 0.0  # wall clock (time.time()) on the worker
    ended_s: float = 0.0
    # Per request:
    prompt_tokens: tuple[int, ...] = ()  # as the engine counted them
    cached_per_request: tuple[int, ...] = ()  # served from the prefix cache (vLLM's num_cached_tokens)
    output_token_ids: tuple[tuple[int, ...], ...] = ()
    report: EngineReport | None = None  # the device's state as the shard ended


class Engine(Protocol):
    async def run_shard(self, cmd: Dispatch) -> ShardResult:
        """Make the shard's model resident (evicting `cmd.evict` first), run every request, return outputs."""

    async def load_model(self, cmd: LoadModel) -> None:
        """Make a model resident ahead of the shards that will need it."""

    def report(self) -> EngineReport:
        """Resident models, cached prefix blocks and memory, now."""
