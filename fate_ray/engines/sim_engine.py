"""SimEngine: the engine model (engine_model.py) run against the wall clock, for Ray without GPUs or models.

One `ModelledEngine` per worker, on the modelled clock: wall seconds since start / `time_scale`. A driver task
sleeps until the engine model's next internal event (or until a new shard or load changes it), advances the model
and resolves the shards that finished. It keeps the state a real engine would report (resident models, cached
blocks, memory) and returns placeholder text, so the Ray runtime can be exercised end to end.
"""

from __future__ import annotations

import asyncio
import math
import time

from fate_ray.engines.base import EngineReport, ShardResult
from fate_ray.engines.engine_model import ModelledEngine, ShardOutcome
from fate_ray.engines.physics import Draws
from fate_ray.events import Dispatch, LoadModel, Shard
from fate_ray.schema.cluster import ClusterSpec

DEFAULT_TIME_SCALE = 0.01  # 100 modelled seconds pass in one wall second: the shipped examples take seconds


class SimEngine:
    def __init__(self, cluster: ClusterSpec, device_id: str, time_scale: float = DEFAULT_TIME_SCALE,
                 draws: Draws | None = None, fail_stages: frozenset[str] = frozenset()):
        device = next(d for d in cluster.devices if d.device_id == device_id)
        self.device = ModelledEngine(cluster, device, draws or Draws())
        self.time_scale = time_scale
        self.fail_stages = fail_stages  # fault injection: shards of these stage ids raise, as a broken model would
        self._t0 = time.monotonic()
        self._virtual_now_s = 0.0  # time_scale 0: the modelled clock jumps from event to event
        self._waiting: dict[str, asyncio.Future] = {}
        self._changed = asyncio.Event()
        self._driver: asyncio.Task | None = None

    def _model_now_s(self) -> float:
        """The device's modelled clock: wall time since start, scaled up."""
        return (time.monotonic() - self._t0) / self.time_scale if self.time_scale > 0 else self._virtual_now_s

    async def run_shard(self, cmd: Dispatch) -> ShardResult:
        if cmd.shard.stage_id in self.fail_stages:
            raise RuntimeError(f"injected failure of stage {cmd.shard.stage_id!r}")
        started = time.time()
        future = asyncio.get_running_loop().create_future()
        self._waiting[cmd.shard.shard_id] = future
        self._resolve(self.device.submit(cmd, self._model_now_s()))
        self._wake_driver()
        outcome: ShardOutcome = await future
        shard = cmd.shard
        texts = tuple(f"[{shard.model} on {cmd.device_id}] {shard.stage_id}#{i}: {n} tokens"
                      for i, n in zip(shard.request_indices, outcome.output_tokens))
        phases = {"activation": outcome.activation_s, "prefill": outcome.prefill_s, "decode": outcome.decode_s}
        # Per request, as a real engine reports them: the planner compares its predicted prefix hits with these.
        return ShardResult(outcome.output_tokens, texts, phases, outcome.cached_tokens, started, time.time(),
                           prompt_tokens=shard.prompt_tokens, cached_per_request=outcome.cached_per_request)

    async def load_model(self, cmd: LoadModel) -> None:
        _, done = self.device.load(cmd, self._model_now_s())
        self._resolve(done)
        self._wake_driver()

    def report(self) -> EngineReport:
        state = self.device.state
        return EngineReport(self.device.residency(), dict(self.device.cached_blocks()), state.used_gib())

    # -- the clock ---------------------------------------------------------------------------------------------------
    def _wake_driver(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        self._changed.set()

    async def _drive(self) -> None:
        """Sleep until the engine model's next event or a change, then advance it; until nothing waits."""
        while self._waiting:
            self._changed.clear()
            next_s = self.device.next_event_s()
            if self.time_scale <= 0 and next_s != math.inf:
                self._virtual_now_s = next_s
                self._resolve(self.device.advance(next_s))
                await asyncio.sleep(0)
                continue
            delay_s = None if next_s == math.inf else max(0.0, (next_s - self._model_now_s()) * self.time_scale)
            try:
                await asyncio.wait_for(self._changed.wait(), delay_s)
            except TimeoutError:
                pass
            self._resolve(self.device.advance(self._model_now_s()))

    def _resolve(self, done: list[tuple[Shard, ShardOutcome]]) -> None:
        for shard, outcome in done:
            future = self._waiting.pop(shard.shard_id, None)
            if future is not None and not future.done():
                future.set_result(outcome)
