"""The engine model: one device running one vLLM engine per ACTIVE model, at iteration level, event to event.

The simulator's ground truth (and SimEngine's in Ray). It never imports the planner's estimator; its constants
and why they hold are in physics.py. Each model's engine keeps vLLM's V1 scheduling state: requests waiting for
KV memory, requests being prefilled (chunked, FCFS, within a per-step token budget) and requests decoding
(continuous batching: every running request shares each step). The model is advanced a *window* at a time: the
steps until the batch next changes (a prefill completes, a request finishes, KV memory runs out), whose total
time has a closed form, so the cost is per event, not per token.

    window with prefills: n steps of max(decode step, prefill chunk) (a mixed step is bound by its slower
                          resource: decodes by memory bandwidth, the chunk by compute)
    decode-only window:   step i costs s0 + gamma x B x i (each step adds B tokens of context):
                          n steps take n s0 + gamma B n (n - 1) / 2

KV memory is a block pool per engine (kv_pool.py): a request is admitted when its uncached prompt blocks fit;
decoding grows each request by a block every `block_tokens` tokens; when the pool is full the newest running
request is preempted and later recomputed, as vLLM's recompute preemption does. Cached prefix blocks live in the
same pool and are evicted LRU under pressure, so whether a prefix survives depends on the load.

Several ACTIVE models on one device time-share its GPU: a window's steps are slowed by the number of engines that
have running requests when the window starts (EST; a window is not re-cut when that number changes, an error
bounded by one window). A shard whose model is loading waits for the load; loads and wakes are drawn
(physics.Draws).

NOTE: external events (a new shard, a load) land between steps: the engine is advanced by whole steps to that
time and the step in progress is dropped (at most one step, a few ms, per interaction).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, MutableSet
from dataclasses import dataclass, field

from fate_ray.engines.kv_pool import KvPool
from fate_ray.engines.physics import MAX_BATCHED_TOKENS, MAX_NUM_SEQS, Draws, EnginePhysics, derive_physics
from fate_ray.events import Dispatch, LoadModel, Shard
from fate_ray.schema.cluster import ClusterSpec, Device
from fate_ray.state import Activation, DeviceState, Residency, block_hashes, chain_blocks
from fate_ray.workload import Segment, output_key


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    start_s: float
    end_s: float
    activation: Activation
    activation_s: float  # waiting for the model: its load or wake, or another shard's load in progress
    prefill_s: float  # from the model being ready to the last request's first token
    decode_s: float  # from then to the last request's last token
    prompt_tokens: int
    cached_tokens: int
    output_tokens: tuple[int, ...]
    cached_per_request: tuple[int, ...]  # prompt tokens each request found in the prefix cache


@dataclass(eq=False, slots=True)
class _Request:
    run: _ShardRun
    pos: int  # in the shard
    prompt_tokens: int  # to prefill (grows by what was generated if preempted and recomputed)
    hashes: tuple[int, ...]  # full blocks of the original prompt
    output_target: int
    generated: int = 0
    prefill_left: int = 0
    private: int = 0  # unhashed blocks it holds (prompt tail, generated tokens)
    pinned: tuple[int, ...] = ()  # hashed prompt blocks it holds in the pool
    recomputed: bool = False  # preempted once: its prompt now includes what it had generated

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass(eq=False, slots=True)
class _ShardRun:
    cmd: Dispatch
    start_s: float
    ready_s: float
    activation: Activation
    outputs: list[int]
    left: int
    prompt_tokens: int
    prefilled_s: float = 0.0
    cached_per_request: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Window:
    end_s: float
    steps: int
    decode_only: bool
    step_s: float = 0.0  # with prefills: every step's duration
    s0_s: float = 0.0  # decode-only: the first step, and its growth per step
    growth_s: float = 0.0
    start_s: float = 0.0


@dataclass(eq=False)
class _ModelEngine:
    model: str
    phys: EnginePhysics
    kv: KvPool
    ready_at_s: float
    clock_s: float
    waiting: deque[_Request] = field(default_factory=deque)
    prefilling: list[_Request] = field(default_factory=list)
    decoding: list[_Request] = field(default_factory=list)
    window: _Window | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)


class ModelledEngine:
    """One device of modelled hardware: what it holds and how its engines run shards."""

    def __init__(self, cluster: ClusterSpec, device: Device, draws: Draws, perturb: float = 0.0,
                 page_cache: MutableSet[str] | None = None):
        self.cluster = cluster
        self.draws = draws
        self.perturb = perturb
        self.block_tokens = cluster.block_tokens
        self.state = DeviceState.empty(cluster, device)  # residency; the engines' pools are the real caches
        self.page_cache = page_cache if page_cache is not None else set()  # models whose weights this node read
        self.engines: dict[str, _ModelEngine] = {}
        self.alive = True
        self.version = 0  # bumped whenever the next event may have moved
        self._loads: dict[str, int] = {}
        self.loads = 0  # cold loads and wakes started, for the benchmark's counts
        self.wakes = 0
        self._physics: dict[str, EnginePhysics] = {}

    @property
    def device_id(self) -> str:
        return self.state.device.device_id

    def physics(self, model: str) -> EnginePhysics:
        phys = self._physics.get(model)
        if phys is None:
            phys = self._physics[model] = derive_physics(self.cluster, model, self.state.device.type, self.perturb,
                                                         self.draws.seed)
        return phys

    # -- commands ---------------------------------------------------------------------------------------------------
    def submit(self, cmd: Dispatch, now_s: float) -> list[tuple[Shard, ShardOutcome]]:
        """Start a shard now; returns shards that had finished by now (call `advance` first to avoid any)."""
        done = self.advance(now_s)
        shard = cmd.shard
        kind = self._activate(shard.model, cmd.evict, now_s)
        eng = self.engines[shard.model]
        outs = [self.draws.output_tokens(shard.workflow_id, shard.stage_id, i, shard.expected_output_tokens,
                                         shard.max_tokens) for i in shard.request_indices]
        prompts = shard.prompt_tokens
        run = _ShardRun(cmd, now_s, max(now_s, eng.ready_at_s), kind, outs, len(outs), sum(prompts),
                        cached_per_request=[0] * len(outs))
        for pos, (tokens, hashes) in enumerate(zip(prompts, shard.block_hashes)):
            eng.waiting.append(_Request(run, pos, tokens, hashes, outs[pos]))
        eng.window = None
        self._admit(eng)
        self.version += 1
        return done

    def load(self, cmd: LoadModel, now_s: float) -> tuple[Activation, list[tuple[Shard, ShardOutcome]]]:
        done = self.advance(now_s)
        kind = self._activate(cmd.model, cmd.evict, now_s)
        self.version += 1
        return kind, done

    def _activate(self, model: str, evict: tuple[str, ...], now_s: float) -> Activation:
        for m in evict:
            eng = self.engines.pop(m, None)
            if eng is not None and eng.has_work:
                raise AssertionError(f"{self.device_id}: evicting {m!r}, which still runs requests")
        kind = self.state.activate(model, now_s, evict)
        if kind == "resident":
            return kind
        phys = self.physics(model)
        n = self._loads[model] = self._loads.get(model, 0) + 1
        key = (model, self.device_id, n)
        if kind == "wake":
            self.wakes += 1
            seconds = self.draws.wake_s(phys, *key)
        else:
            self.loads += 1
            seconds = self.draws.load_s(phys, model in self.page_cache, *key)
            self.page_cache.add(model)
        self.engines[model] = _ModelEngine(model, phys, KvPool(phys.kv_capacity_blocks), now_s + seconds, now_s)
        return kind

    def preload(self, model: str) -> None:
        """The model was loaded before the run started (the warm regime): ACTIVE and ready at t = 0."""
        self.state.activate(model, 0.0)
        phys = self.physics(model)
        self.engines[model] = _ModelEngine(model, phys, KvPool(phys.kv_capacity_blocks), 0.0, 0.0)
        self.page_cache.add(model)

    def kill(self) -> None:
        self.alive = False
        self.engines.clear()
        self.version += 1

    # -- time ----------------------------------------------------------------------------------------------------------
    def next_event_s(self) -> float:
        """When the next shard may finish or the batch changes (inf when idle)."""
        best = math.inf
        for eng in self.engines.values():
            w = eng.window
            if w is None:
                # NOTE: the idle and cached cases inline, saving a `_window` call for most engines on every event.
                if not (eng.waiting or eng.prefilling or eng.decoding):
                    continue
                w = self._window(eng)
            if w.end_s < best:
                best = w.end_s
        return best

    def advance(self, now_s: float) -> list[tuple[Shard, ShardOutcome]]:
        """Run every engine up to `now_s`; returns the shards that finished, in finish order."""
        done: list[tuple[Shard, ShardOutcome]] = []
        if not self.alive:
            return done
        while True:
            eng, w = None, None
            for e in self.engines.values():
                ew = e.window
                if ew is None:  # NOTE: inlined as in next_event_s
                    if not (e.waiting or e.prefilling or e.decoding):
                        continue
                    ew = self._window(e)
                if ew.end_s <= now_s and (w is None or ew.end_s < w.end_s):
                    eng, w = e, ew
            if eng is None:
                break
            self._apply(eng, w, w.steps, w.end_s, done)
        for eng in self.engines.values():
            w = eng.window
            if w is not None and eng.clock_s < now_s and w.steps:
                steps = self._steps_by(w, now_s)
                if steps:
                    self._apply(eng, w, steps, now_s, done)
            if eng.clock_s < now_s:
                eng.clock_s = now_s
                eng.window = None
        if done:
            self.version += 1
        return done

    @staticmethod
    def _steps_by(w: _Window, now_s: float) -> int:
        dt = now_s - w.start_s
        if not w.decode_only:
            return min(w.steps - 1, int(dt / w.step_s)) if w.step_s > 0 else 0
        a, b = w.growth_s / 2, w.s0_s - w.growth_s / 2  # n steps take a n^2 + b n
        n = dt / b if a <= 0 else (-b + math.sqrt(b * b + 4 * a * dt)) / (2 * a)
        return max(0, min(w.steps - 1, int(n)))

    # -- one engine ----------------------------------------------------------------------------------------------------
    def _busy_engines(self) -> int:
        busy = 0
        for e in self.engines.values():  # NOTE: a loop, not sum() over a generator: this runs for every window
            if e.prefilling or e.decoding:
                busy += 1
        return max(1, busy)

    def _window(self, eng: _ModelEngine) -> _Window | None:
        if eng.window is not None:
            return eng.window
        if not (eng.waiting or eng.prefilling or eng.decoding):
            return None
        if eng.ready_at_s > eng.clock_s:  # the model is still loading: the first event is the load completing
            eng.window = _Window(eng.ready_at_s, 0, True, start_s=eng.clock_s)
            return eng.window
        if eng.waiting:
            self._admit(eng)
        if not (eng.prefilling or eng.decoding):
            # Nothing fits next to nothing: a request larger than the pool runs alone, over capacity.
            self._admit(eng, force=True)
        slow = self._busy_engines()
        phys, bt = eng.phys, self.block_tokens
        decoders = len(eng.decoding)
        context, remaining = self._decode_totals(eng.decoding)
        # Steps until the pool cannot give a decoding request its next block.
        room = eng.kv.free_blocks
        kv_steps = math.inf if not decoders else max(1, room * bt // decoders)
        if eng.prefilling:
            budget = max(1, MAX_BATCHED_TOKENS - decoders)
            head = eng.prefilling[0]
            pre_steps = 1 if head.prefill_left <= budget else head.prefill_left // budget
            steps = int(max(1, min(pre_steps, remaining, kv_steps)))
            chunk = min(budget, sum(r.prefill_left for r in eng.prefilling)) if steps == 1 else budget
            position = head.prompt_tokens - head.prefill_left + steps * chunk / 2
            prefill_s = phys.prefill_s(chunk, position)
            decode_s = phys.decode_step_ms(decoders, context + decoders * steps / 2) / 1000 if decoders else 0.0
            step_s = max(prefill_s, decode_s) * slow
            eng.window = _Window(eng.clock_s + steps * step_s, steps, False, step_s=step_s, start_s=eng.clock_s)
        else:
            steps = int(max(1, min(remaining, kv_steps)))
            s0 = phys.decode_step_ms(decoders, context) / 1000 * slow
            growth = phys.gamma_ms * decoders / 1000 * slow
            total = steps * s0 + growth * steps * (steps - 1) / 2
            eng.window = _Window(eng.clock_s + total, steps, True, s0_s=s0, growth_s=growth, start_s=eng.clock_s)
        return eng.window

    @staticmethod
    def _decode_totals(decoding: list[_Request]) -> tuple[int, float]:
        """The decoding requests' total context, and the fewest tokens any of them has left (inf: none decodes).
        NOTE: one loop instead of sum() and min() over two generators, on every window."""
        context, remaining = 0, math.inf
        for r in decoding:
            context += r.prompt_tokens + r.generated
            left = r.output_target - r.generated
            if left < remaining:
                remaining = left
        return context, remaining

    def _apply(self, eng: _ModelEngine, w: _Window, steps: int, end_s: float, done: list) -> None:
        """Advance `eng` by `steps` steps of window `w`, ending at `end_s`."""
        eng.window = None
        eng.clock_s = end_s
        if not steps:
            return
        ended = []  # in the order of eng.decoding after the prefills that complete join it
        for r in eng.decoding:
            r.generated += steps
            if r.generated >= r.output_target:
                ended.append(r)
        if eng.prefilling:
            budget = max(1, MAX_BATCHED_TOKENS - len(eng.decoding))
            tokens = steps * budget
            finished = []
            for r in eng.prefilling:
                take = min(tokens, r.prefill_left)
                r.prefill_left -= take
                tokens -= take
                if r.prefill_left == 0:
                    finished.append(r)
                if tokens <= 0 or w.steps > 1:  # a multi-step window serves its head only
                    break
            for r in finished:
                eng.prefilling.remove(r)
                r.generated = max(r.generated, 1)  # the step that ends a prefill samples the first token
                r.run.prefilled_s = max(r.run.prefilled_s, end_s)
                eng.decoding.append(r)
                if r.generated >= r.output_target:
                    ended.append(r)
        if ended:
            eng.decoding = [r for r in eng.decoding if r.generated < r.output_target]
            for r in ended:
                self._finish_request(eng, r, end_s, done)
        self._grow(eng)
        if eng.waiting:
            self._admit(eng)

    def _grow(self, eng: _ModelEngine) -> None:
        """Give decoding requests the blocks their new tokens need; preempt the newest when the pool is full."""
        bt = self.block_tokens
        # The private blocks each decoding request needs: its context beyond the hashed prompt blocks it pinned.
        # NOTE: computed once per request, for the need and then for its new holding (kept aligned with
        # eng.decoding: a preempted request leaves both from the end).
        blocks = [-(-(r.prompt_tokens + r.generated - chain_blocks(r.pinned) * bt) // bt) for r in eng.decoding]
        need = sum(blocks) - sum(r.private for r in eng.decoding)
        if need <= 0:
            return
        while not eng.kv.make_room(need) and eng.decoding:
            victim = eng.decoding.pop()  # vLLM preempts the lowest-priority (last admitted) running request
            need -= blocks.pop() - victim.private
            eng.kv.release(victim.pinned, victim.private)
            # Recompute: what it generated becomes prompt, to prefill again when memory allows.
            victim.prompt_tokens, victim.output_target = victim.context, victim.output_target - victim.generated
            victim.generated, victim.private, victim.pinned, victim.recomputed = 0, 0, (), True
            eng.waiting.appendleft(victim)
        if need > 0:
            eng.kv.private_blocks += need
        for r, held in zip(eng.decoding, blocks):
            r.private = held

    def _admit(self, eng: _ModelEngine, force: bool = False) -> None:
        """Move waiting requests to prefill, FCFS, while their uncached prompt blocks fit (`force`: the head
        request even if it does not, when nothing else runs: a prompt larger than the pool)."""
        bt = self.block_tokens
        kv = eng.kv
        while eng.waiting and len(eng.prefilling) + len(eng.decoding) < MAX_NUM_SEQS:
            r = eng.waiting[0]
            matched = kv.match(r.hashes)
            private = -(-(r.prompt_tokens - chain_blocks(r.hashes) * bt) // bt)
            if kv.admit(r.hashes, matched, private):
                r.pinned, r.private = r.hashes, private
            elif force:
                matched, r.pinned, r.private = 0, (), -(-r.prompt_tokens // bt)
                kv.private_blocks += r.private
            else:
                return
            force = False
            eng.waiting.popleft()
            cached = min(chain_blocks(r.hashes[:matched]) * bt, r.prompt_tokens - 1)  # vLLM recomputes >= 1 token
            r.prefill_left = r.prompt_tokens - cached
            if not r.recomputed:
                r.run.cached_per_request[r.pos] = cached
            eng.prefilling.append(r)

    def _finish_request(self, eng: _ModelEngine, r: _Request, end_s: float, done: list) -> None:
        run = r.run
        shard = run.cmd.shard
        index = shard.request_indices[r.pos]
        out = run.outputs[r.pos]
        segments = shard.prompts[r.pos] + (Segment(output_key(shard.workflow_id, shard.stage_id, index), out),)
        full = block_hashes(segments, self.block_tokens)
        eng.kv.release(r.pinned, r.private, keep=full[len(r.pinned):])
        run.left -= 1
        if run.left == 0:
            prefilled = max(run.prefilled_s, run.ready_s)
            outcome = ShardOutcome(run.start_s, end_s, run.activation, run.ready_s - run.start_s,
                                   prefilled - run.ready_s, end_s - prefilled, run.prompt_tokens,
                                   sum(run.cached_per_request), tuple(run.outputs), tuple(run.cached_per_request))
            done.append((shard, outcome))

    # -- what a worker reports -------------------------------------------------------------------------------------
    def residency(self) -> dict[str, Residency]:
        return dict(self.state.residency)

    def take_evicted(self) -> dict[str, tuple[int, ...]]:
        """Blocks each engine evicted since the last call (the delta a worker reports)."""
        out = {}
        for model, eng in self.engines.items():
            gone = eng.kv.take_evicted()
            if gone:
                out[model] = tuple(gone)
        return out

    def cached_blocks(self) -> Mapping[str, tuple[int, ...]]:
        return {model: eng.kv.cached() for model, eng in self.engines.items()}
