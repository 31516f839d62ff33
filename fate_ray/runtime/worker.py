"""GpuWorker: one Ray actor per GPU, hosting the Engine that runs shards on that device (`sim`: SimEngine;
`vllm`: VllmEngine, real inference)."""

from __future__ import annotations

import ray

from fate_ray.engines.base import EngineReport, ShardResult
from fate_ray.engines.physics import Draws
from fate_ray.engines.sim_engine import DEFAULT_TIME_SCALE, SimEngine
from fate_ray.events import Dispatch, LoadModel
from fate_ray.schema.cluster import ClusterSpec


def worker_name(device_id: str) -> str:
    return "fate-worker-" + device_id.replace("/", "-")


@ray.remote(num_gpus=1, num_cpus=0)
class GpuWorker:
    """Async actor: shards run concurrently on its event loop (the engine batches them)."""

    def __init__(self, cluster: ClusterSpec, device_id: str, engine: str = "sim",
                 time_scale: float = DEFAULT_TIME_SCALE, fail_stages: frozenset[str] = frozenset(),
                 draws: Draws | None = None):
        self.device_id = device_id
        if engine == "vllm":
            from fate_ray.engines.vllm_engine import VllmEngine  # vLLM is an optional extra: import it only here

            self.engine = VllmEngine(cluster, device_id)
        elif engine == "sim":
            self.engine = SimEngine(cluster, device_id, time_scale, draws, fail_stages)
        else:
            raise ValueError(f"unknown engine {engine!r}; known: sim, vllm")

    async def run_shard(self, cmd: Dispatch) -> ShardResult:
        return await self.engine.run_shard(cmd)

    async def load_model(self, cmd: LoadModel) -> None:
        await self.engine.load_model(cmd)

    async def report(self) -> EngineReport:
        return self.engine.report()

    async def ping(self) -> str:
        return self.device_id

    async def engine_events(self) -> dict[str, int]:
        """What the engine did on its own count (loads, unloads, sleeps, wakes): real engines only."""
        counts = dict(getattr(self.engine, "events", {}))
        if hasattr(self.engine, "kv_event_counts"):
            counts.update(self.engine.kv_event_counts())
        return counts

    async def shutdown(self) -> None:
        """Stop the engines before the actor goes (vLLM's engine cores are child processes)."""
        if hasattr(self.engine, "shutdown"):
            await self.engine.shutdown()
