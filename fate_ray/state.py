"""Device state: model residency with memory accounting, and the prefix cache of chained block hashes.

Two owners use these classes: the Controller keeps one `DeviceState` per device as its belief (updated by the
commands it issues and the reports it receives), and an engine (simulated or real) keeps the truth. Policies never
see the mutable objects: they get a `ClusterSnapshot` of frozen `DeviceSnapshot`s.

Residency follows vLLM: ACTIVE models hold weights + KV reserve in device memory; SLEEPING models (sleep level 1)
keep weights in host RAM and free the device, and lose their KV cache; ABSENT models must be loaded cold. A device
that cannot sleep (vLLM on CPU) only knows ACTIVE and ABSENT.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from fate_ray.schema.cluster import ClusterSpec, Device, ModelSpec
from fate_ray.workload import Segment

Residency = Literal["ACTIVE", "SLEEPING", "ABSENT"]
Activation = Literal["resident", "wake", "load"]


def activation_for(state: Residency) -> Activation:
    """What making a model ACTIVE costs, by its residency: nothing, a wake from sleep, or a cold load."""
    return "resident" if state == "ACTIVE" else "wake" if state == "SLEEPING" else "load"


def block_hashes(segments: Sequence[Segment], block_tokens: int) -> tuple[int, ...]:
    """The chain of a token stream's full blocks, hashed a *run* of blocks at a time, like vLLM's chained hashes.

    A run is up to MAX_RUN_BLOCKS full blocks that end inside one segment (the first may straddle in from the
    previous segment); its hash covers the (segment key, token range) pieces it holds plus the hash before it, so
    it stands for the whole prefix up to its last block, and its low bits hold how many blocks that prefix has
    (`blocks_through`). Two prompts share a run exactly when they share all of its blocks (equal segment keys mean
    equal tokens), so matching runs counts shared blocks as matching blocks would, at a fraction of the cost.
    A trailing partial block is not cached.

    NOTE: runs, not single blocks, because hashing and caching every 16-token block of long prompts dominated
    the simulator's time; the cap keeps eviction granular (a long system prompt loses its tail run by run).
    """
    out: list[int] = []
    carry: _Carry = (0, (), 0, 0)
    for seg in segments:
        runs, carry = _SEGMENT_STEPS.step(carry, seg, block_tokens)
        out.extend(runs)
    return tuple(out)


MAX_RUN_BLOCKS = 32
_COUNT_BITS = 24
_COUNT_MASK = (1 << _COUNT_BITS) - 1
_HASH_MASK = (1 << 39) - 1


def blocks_through(run_hash: int) -> int:
    """Full blocks of the prefix that ends with this run (encoded in the hash's low bits)."""
    return run_hash & _COUNT_MASK


def chain_blocks(hashes: Sequence[int]) -> int:
    """Full blocks of a whole chain."""
    return hashes[-1] & _COUNT_MASK if hashes else 0


# (hash of the last run, pieces of the open block, tokens in the open block, blocks so far)
_Carry = tuple[int, tuple[tuple[int, int, int], ...], int, int]


class _SegmentMemo:
    """`_hash_segment` memoised per (carry, segment): an LRU of at most `capacity` steps.

    NOTE: memoised because the same segments (system prompts, a parent's context) start many prompts. Bounded,
    because keys name each workflow's own outputs: a memo cleared only at 200,000 entries held about 30 entries
    (400 bytes each) for every workflow the planner had seen. An exact LRU rather than generations, so that once
    full it holds a constant `capacity` entries. A step is a pure function of its key, so the bound changes no
    hash, only how often one is recomputed.
    """

    __slots__ = ("capacity", "_steps")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._steps: OrderedDict[tuple, tuple[tuple[int, ...], _Carry]] = OrderedDict()

    def step(self, carry: _Carry, seg: Segment, block_tokens: int) -> tuple[tuple[int, ...], _Carry]:
        """The runs `seg` completes after `carry`, and the carry after it."""
        key = (carry, seg.key, seg.tokens, block_tokens)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        step = self._steps[key] = _hash_segment(carry, seg, block_tokens)
        if len(self._steps) > self.capacity:
            self._steps.popitem(last=False)
        return step

    def __len__(self) -> int:
        return len(self._steps)


# 2,048 steps (under 1 MiB): twice the size from which the agentic suite (long, growing contexts) runs as fast as
# with an unbounded memo.
_SEGMENT_STEPS = _SegmentMemo(2048)


def _hash_segment(carry: _Carry, seg: Segment, block_tokens: int) -> tuple[tuple[int, ...], _Carry]:
    prev, pieces, filled, total = carry
    runs: list[int] = []
    start = 0
    while start < seg.tokens:
        blocks = min(MAX_RUN_BLOCKS, (filled + seg.tokens - start) // block_tokens)
        if blocks == 0:
            pieces = (*pieces, (seg.key, start, seg.tokens))
            filled += seg.tokens - start
            break
        take = blocks * block_tokens - filled
        total += blocks
        prev = ((hash((prev, *pieces, seg.key, start, start + take)) & _HASH_MASK) << _COUNT_BITS) | min(total,
                                                                                                         _COUNT_MASK)
        runs.append(prev)
        pieces, filled = (), 0
        start += take
    return tuple(runs), (prev, pieces, filled, total)


def run_sizes(hashes: Sequence[int], start: int = 0) -> list[int]:
    """Blocks each run of a chain adds to its prefix, from run `start` on."""
    before = blocks_through(hashes[start - 1]) if start else 0
    out = []
    for h in hashes[start:]:
        through = blocks_through(h)
        out.append(through - before)
        before = through
    return out


def prefix_match(present: Container[int], hashes: Sequence[int]) -> int:
    """Leading runs of `hashes` in `present`, by binary search: valid when `present` is prefix-closed (holding a
    run implies holding its prefix), as a PrefixCache and any union of whole prompts' runs are."""
    lo, hi = 0, len(hashes)  # invariant: hashes[:lo] present, hashes[hi] absent or past the end
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hashes[mid - 1] in present:
            lo = mid
        else:
            hi = mid - 1
    return lo


def matched_blocks(present: Container[int], hashes: Sequence[int]) -> int:
    """Full blocks of the longest prefix of `hashes` held in `present` (prefix-closed)."""
    n = prefix_match(present, hashes)
    return hashes[n - 1] & _COUNT_MASK if n else 0


class PrefixCache:
    """An LRU set of block runs (block_hashes) with a capacity in blocks (one per model on a device).

    Within one insert the runs are aged tail first, as vLLM frees a finished request's blocks in reverse order:
    a run is always older than every run of its own prefix. So eviction never removes a prefix while keeping its
    extension, the cache stays prefix-closed, and `match_blocks` can binary-search.

    NOTE: one OrderedDict of run -> blocks it adds to its prefix, least recently used first, because the
    planner's belief lives as long as the planner and fills up to the devices' KV capacity: about 140 bytes a run
    beside its hash in the load bench, half what a tick per run plus a log of touches held, and no slower
    (moving a touched entry and popping the oldest are O(1) in C).
    """

    __slots__ = ("capacity_blocks", "_runs", "_blocks")

    def __init__(self, capacity_blocks: int, runs: Iterable[int] = ()):
        self.capacity_blocks = capacity_blocks
        self._runs: OrderedDict[int, int] = OrderedDict()  # run -> blocks it adds to its prefix, least recent first
        self._blocks = 0
        # Given least recently used first, as `runs()` returns them, out of chain order: a run's own size is taken
        # as at most MAX_RUN_BLOCKS (exact for every run but a chain's short ones).
        self._touch((h, min(blocks_through(h), MAX_RUN_BLOCKS)) for h in runs)
        self._evict_over_capacity()

    def match_blocks(self, hashes: Sequence[int]) -> int:
        """Full blocks of the longest prefix of `hashes` held (a run is only useful after its predecessors)."""
        return matched_blocks(self._runs, hashes)

    def _touch(self, weighted_runs: Iterable[tuple[int, int]]) -> None:
        """Make (run, blocks) pairs, given least recently used first, the most recently used (a run already held
        keeps its size)."""
        held = self._runs
        added = 0
        for h, blocks in weighted_runs:
            if h in held:
                held.move_to_end(h)
            else:
                held[h] = blocks
                added += blocks
        self._blocks += added

    def insert(self, hashes: Sequence[int]) -> int:
        """Touch or add a chain's runs as most recently used (the head of the prompt most recent of all); returns
        how many blocks were evicted to make room."""
        if not hashes:
            return 0
        self._touch(zip(reversed(hashes), reversed(run_sizes(hashes))))
        return self._evict_over_capacity()

    def _evict_over_capacity(self) -> int:
        evicted = 0
        held = self._runs
        while self._blocks > self.capacity_blocks and held:
            blocks = held.popitem(last=False)[1]
            self._blocks -= blocks
            evicted += blocks
        return evicted

    def discard(self, hashes: Iterable[int]) -> None:
        """Forget runs the engine evicted."""
        for h in hashes:
            blocks = self._runs.pop(h, None)
            if blocks is not None:
                self._blocks -= blocks

    def runs(self) -> tuple[int, ...]:
        """Runs from least to most recently used."""
        return tuple(self._runs)

    def copy(self) -> PrefixCache:
        twin = PrefixCache(self.capacity_blocks)
        twin._runs = self._runs.copy()
        twin._blocks = self._blocks
        return twin

    def footprint_bytes(self) -> int:
        """Bytes held: the ordered table and the runs' hashes (the load bench reports the planner's belief)."""
        return sys.getsizeof(self._runs) + sum(map(sys.getsizeof, self._runs))

    def __len__(self) -> int:
        """Blocks held."""
        return self._blocks

    def __contains__(self, h: int) -> bool:
        return h in self._runs


@dataclass(frozen=True, slots=True)
class ActivationPlan:
    """What making a model ACTIVE costs on a device: the kind of activation and the models it must evict."""

    kind: Activation
    evict: tuple[str, ...]
    feasible: bool  # False when the memory is held by models that are busy right now


_RESIDENT = ActivationPlan("resident", (), True)


def plan_activation(model: str, residency: Mapping[str, Residency], busy: Container[str],
                    last_used_s: Mapping[str, float], memory_gib: float, models: Mapping[str, ModelSpec]) -> ActivationPlan:
    """How `model` would become ACTIVE: evict idle ACTIVE models, least recently used first (pure)."""
    kind = activation_for(residency.get(model, "ABSENT"))
    if kind == "resident":
        return _RESIDENT  # the common answer (a queue head, a candidate), without building a record each time
    free = memory_gib - sum(models[m].footprint_gib for m, r in residency.items() if r == "ACTIVE")
    need = models[model].footprint_gib
    evict: list[str] = []
    if need > free + 1e-9:
        idle = sorted((m for m, r in residency.items() if r == "ACTIVE" and m not in busy),
                      key=lambda m: last_used_s.get(m, 0.0))
        for m in idle:
            evict.append(m)
            free += models[m].footprint_gib
            if need <= free + 1e-9:
                break
    return ActivationPlan(kind, tuple(evict), need <= free + 1e-9)


@dataclass
class DeviceState:
    """Mutable state of one device (one owner at a time: the Controller's belief or an engine's truth)."""

    device: Device
    memory_gib: float
    host_offload_gib: float
    supports_sleep: bool
    cluster: ClusterSpec
    residency: dict[str, Residency] = field(default_factory=dict)
    last_used_s: dict[str, float] = field(default_factory=dict)
    caches: dict[str, PrefixCache] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)  # model -> shards running now (cannot be evicted)
    version: int = 0  # bumped on every change, so snapshots can be reused while nothing changed

    @classmethod
    def empty(cls, cluster: ClusterSpec, device: Device) -> DeviceState:
        dtype = cluster.device_types[device.type]
        return cls(device, dtype.memory_gib, dtype.host_offload_gib, dtype.supports_sleep, cluster)

    # -- queries -------------------------------------------------------------------------------------------------
    def state_of(self, model: str) -> Residency:
        return self.residency.get(model, "ABSENT")

    def used_gib(self) -> float:
        models = self.cluster.models
        return sum(models[m].footprint_gib for m, r in self.residency.items() if r == "ACTIVE")

    def plan_activation(self, model: str) -> ActivationPlan:
        """How `model` would become ACTIVE now: evict idle ACTIVE models, least recently used first."""
        return plan_activation(model, self.residency, self.busy, self.last_used_s, self.memory_gib,
                               self.cluster.models)

    def cached_tokens(self, model: str, hashes: Sequence[int]) -> int:
        cache = self.caches.get(model)
        return cache.match_blocks(hashes) * self.cluster.block_tokens if cache else 0

    # -- transitions ---------------------------------------------------------------------------------------------
    def activate(self, model: str, now_s: float, evict: Sequence[str] = ()) -> Activation:
        """Make `model` ACTIVE after evicting `evict`; returns what it cost (resident, wake or load)."""
        for m in evict:
            self.deactivate(m)
        kind = activation_for(self.state_of(model))
        if kind != "resident":
            self.residency[model] = "ACTIVE"
            spec = self.cluster.models[model]
            self.caches[model] = PrefixCache(spec.cache_capacity_blocks(self.cluster.block_tokens))
            self.version += 1
        self.last_used_s[model] = now_s
        return kind

    def deactivate(self, model: str) -> None:
        """Sleep (if the device can and host RAM allows) or unload; either way the KV cache is gone."""
        if self.state_of(model) != "ACTIVE":
            return
        self.caches.pop(model, None)
        if self.supports_sleep and self.cluster.models[model].weights_gib <= self.host_offload_gib:
            self.residency[model] = "SLEEPING"
            self._trim_host_ram()
        else:
            self.residency.pop(model)
        self.version += 1

    def _trim_host_ram(self) -> None:
        models = self.cluster.models
        sleeping = sorted((m for m, r in self.residency.items() if r == "SLEEPING"),
                          key=lambda m: self.last_used_s.get(m, 0.0))
        used = sum(models[m].weights_gib for m in sleeping)
        for m in sleeping:
            if used <= self.host_offload_gib:
                break
            used -= models[m].weights_gib
            self.residency.pop(m)

    def insert_blocks(self, model: str, hashes: Iterable[int]) -> None:
        cache = self.caches.get(model)
        if cache is not None:
            cache.insert(hashes)
            self.version += 1

    def shard_started(self, model: str) -> None:
        self.busy[model] = self.busy.get(model, 0) + 1

    def shard_ended(self, model: str, now_s: float) -> None:
        self.busy[model] -= 1
        if not self.busy[model]:
            del self.busy[model]
        self.last_used_s[model] = now_s

    def replace(self, residency: Mapping[str, Residency], blocks: Mapping[str, Sequence[int]] | None,
                removed: Mapping[str, Sequence[int]] | None = None) -> None:
        """Adopt a worker's report as the truth (the belief may have drifted, e.g. after a restart): its
        residency, and its cached blocks when it sends them all, else the belief less what it evicted."""
        self.residency = {m: r for m, r in residency.items() if r != "ABSENT"}
        models = self.cluster.models
        caches = {}
        for m, r in self.residency.items():
            if r != "ACTIVE":
                continue
            if blocks is not None or m not in self.caches:
                held = blocks.get(m, ()) if blocks is not None else ()
                caches[m] = PrefixCache(models[m].cache_capacity_blocks(self.cluster.block_tokens), held)
            else:
                caches[m] = self.caches[m]
                caches[m].discard((removed or {}).get(m, ()))
        self.caches = caches
        self.version += 1


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """What a policy may know about one device at planning time."""

    device: Device
    memory_gib: float
    concurrency: int
    alive: bool
    residency: Mapping[str, Residency]
    # NOTE: the live caches, shared rather than copied because copying thousands of blocks per planning round
    # would dominate the simulator. Read-only, and valid until the Controller handles its next event.
    caches: Mapping[str, PrefixCache]
    busy_models: frozenset[str]
    free_at_s: float  # estimated time its backlog drains (running + queued shards)
    running_shards: int
    queued_requests: int  # requests queued or running: the load a request router sees
    last_used_s: Mapping[str, float] = field(default_factory=dict)  # model -> last time a shard of it ended or started
    # model -> tokens (prompt + expected output) of the requests running now: the KV they hold, not the prefix cache
    running_tokens: Mapping[str, int] = field(default_factory=dict)

    def plan_activation(self, model: str, models: Mapping[str, ModelSpec]) -> ActivationPlan:
        return plan_activation(model, self.residency, self.busy_models, self.last_used_s, self.memory_gib, models)

    def state_of(self, model: str) -> Residency:
        return self.residency.get(model, "ABSENT")

    def cached_tokens(self, model: str, hashes: Sequence[int], block_tokens: int) -> int:
        cache = self.caches.get(model)
        return cache.match_blocks(hashes) * block_tokens if cache else 0


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    now_s: float
    devices: tuple[DeviceSnapshot, ...]

    def device(self, device_id: str) -> DeviceSnapshot:
        for d in self.devices:
            if d.device.device_id == device_id:
                return d
        raise KeyError(device_id)


def snapshot_device(state: DeviceState, concurrency: int, alive: bool, free_at_s: float, running_shards: int,
                    queued_requests: int, running_tokens: Mapping[str, int] | None = None) -> DeviceSnapshot:
    """Freeze a device's state for one planning round."""
    return DeviceSnapshot(
        device=state.device, memory_gib=state.memory_gib, concurrency=concurrency, alive=alive,
        residency=MappingProxyType(dict(state.residency)), caches=MappingProxyType(dict(state.caches)),
        busy_models=frozenset(state.busy), free_at_s=free_at_s, running_shards=running_shards,
        queued_requests=queued_requests, last_used_s=MappingProxyType(dict(state.last_used_s)),
        running_tokens=MappingProxyType(dict(running_tokens or {})),
    )
