"""SimEngine: runs a shard by sleeping its modelled duration (engines/modelled_device.py) x `time_scale`.

It keeps the same device state a real engine would report (resident models, prefix blocks, memory) and returns
deterministic placeholder text, so the Ray runtime can be exercised end to end without a GPU or a model.
Concurrent shards on one device overlap in time, as they would on a batching engine.
"""

from __future__ import annotations

import asyncio
import time

from fate_ray.engines.base import EngineReport, ShardResult
from fate_ray.engines.modelled_device import ModelledDevice, NoiseModel
from fate_ray.events import Dispatch, LoadModel
from fate_ray.schema.cluster import ClusterSpec

DEFAULT_TIME_SCALE = 0.01  # 100 modelled seconds pass in one wall second: the shipped examples take seconds


class SimEngine:
    def __init__(self, cluster: ClusterSpec, device_id: str, time_scale: float = DEFAULT_TIME_SCALE,
                 noise: NoiseModel | None = None, fail_stages: frozenset[str] = frozenset()):
        device = next(d for d in cluster.devices if d.device_id == device_id)
        self.device = ModelledDevice(cluster, device, noise or NoiseModel())
        self.time_scale = time_scale
        self.fail_stages = fail_stages  # fault injection: shards of these stage ids raise, as a broken model would
        self._t0 = time.monotonic()

    def _model_now_s(self) -> float:
        """The device's modelled clock: wall time since start, scaled up."""
        return (time.monotonic() - self._t0) / self.time_scale if self.time_scale > 0 else 0.0

    async def run_shard(self, cmd: Dispatch) -> ShardResult:
        if cmd.shard.stage_id in self.fail_stages:
            raise RuntimeError(f"injected failure of stage {cmd.shard.stage_id!r}")
        started = time.time()
        now_s = self._model_now_s()
        outcome = self.device.start(cmd, now_s)
        try:
            await asyncio.sleep((outcome.end_s - outcome.start_s) * self.time_scale)
        finally:
            self.device.finish(cmd.shard, outcome)
        shard = cmd.shard
        texts = tuple(f"[{shard.model} on {cmd.device_id}] {shard.stage_id}#{i}: {n} tokens"
                      for i, n in zip(shard.request_indices, outcome.output_tokens))
        phases = {"activation": outcome.activation_s, "prefill": outcome.prefill_s, "decode": outcome.decode_s}
        return ShardResult(outcome.output_tokens, texts, phases, outcome.cached_tokens, started, time.time())

    async def load_model(self, cmd: LoadModel) -> None:
        self.device.load(cmd, self._model_now_s())

    def report(self) -> EngineReport:
        state = self.device.state
        blocks = {m: c.blocks() for m, c in state.caches.items()}
        return EngineReport(dict(state.residency), blocks, state.used_gib())
