"""vLLM's KV cache events, in the planner's block keys: which prefix blocks an engine holds, as the engine says.

vLLM publishes `BlockStored` (block hashes, the parent block's hash, the blocks' token ids) and `BlockRemoved`
(block hashes) over ZMQ. Its hashes are its own (seeded per process), so they are matched to the planner's keys
through token ids, never by recomputing vLLM's hash:
- every stored block gets a *chain id*: a hash of its parent's chain id and its own token ids, so equal token
  prefixes have equal chain ids in any process;
- when a request finishes, the worker knows both its token ids and the planner's keys for its prompt and output
  (`state.block_hashes`), so it registers, for each full block, the chain id -> the planner's run that covers it;
- a removed block's chain id then names the planner run to drop from the held set.
A block stored and removed before any request registered its chain (a request still running) is simply missed;
the LRU bound of the held set (vllm_engine.py) still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fate_ray.state import run_sizes

logger = logging.getLogger(__name__)

MAX_ENTRIES_PER_BLOCK = 4  # the maps are pruned when they outgrow this many entries per KV block the engine has


def chain_ids(token_ids: Sequence[int], block_tokens: int, parent: int = 0) -> list[int]:
    """Chain ids of the full blocks of `token_ids`, continuing the chain after `parent` (0: the start)."""
    out = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(token_ids[start:start + block_tokens])))
        out.append(parent)
    return out


def runs_by_block(runs: Sequence[int]) -> list[int]:
    """For each full block of a chain, the planner run (state.block_hashes) that covers it."""
    return [run for run, blocks in zip(runs, run_sizes(runs)) for _ in range(blocks)]


class KvBlockIndex:
    """One engine's map from vLLM's block hashes to the planner's runs, fed by its events and finished requests."""

    def __init__(self, block_tokens: int, capacity_blocks: int = 1024):
        self.block_tokens = block_tokens
        self.bound(capacity_blocks)
        self._chain_of: dict[int, int] = {}  # vLLM block hash -> chain id
        self._run_of: dict[int, int] = {}  # chain id -> the planner run covering that block
        self.stored = 0
        self.removed = 0

    def bound(self, capacity_blocks: int) -> None:
        """Size the maps by the engine's KV blocks (known once it has started)."""
        self.max_entries = MAX_ENTRIES_PER_BLOCK * max(1, capacity_blocks)

    def register(self, token_ids: Sequence[int], runs: Sequence[int]) -> None:
        """A finished request: its prompt and output token ids, and the planner's runs for the same tokens."""
        if len(self._run_of) > self.max_entries:
            self._run_of.clear()  # bounded; chains that are still cached are registered again by their next use
        for chain, run in zip(chain_ids(token_ids, self.block_tokens), runs_by_block(runs)):
            self._run_of[chain] = run

    def on_stored(self, block_hashes: Sequence[int], parent_hash: int | None, token_ids: Sequence[int]) -> None:
        parent = 0 if parent_hash is None else self._chain_of.get(parent_hash)
        if parent is None:
            return  # its parent was stored before we listened: the chain cannot be followed
        if len(self._chain_of) > self.max_entries:
            self._chain_of.clear()
        for vllm_hash, chain in zip(block_hashes, chain_ids(token_ids, self.block_tokens, parent)):
            self._chain_of[vllm_hash] = chain
        self.stored += len(block_hashes)

    def on_removed(self, block_hashes: Sequence[int]) -> list[int]:
        """The planner runs that are no longer whole, for blocks the engine evicted."""
        gone = []
        for vllm_hash in block_hashes:
            chain = self._chain_of.pop(vllm_hash, None)
            run = self._run_of.pop(chain, None) if chain is not None else None
            if run is not None:
                gone.append(run)
        self.removed += len(block_hashes)
        return gone


class KvEventListener:
    """A SUB socket bound on loopback that one engine's publisher connects to (vLLM connects rather than binds
    to a `tcp://host:port` endpoint), so no port is guessed and nothing listens beyond this host."""

    def __init__(self, index: KvBlockIndex, on_removed: Callable[[list[int]], None], on_cleared: Callable[[], None]):
        import zmq
        import zmq.asyncio

        self.index, self.on_removed, self.on_cleared = index, on_removed, on_cleared
        self.sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    async def run(self) -> None:
        """Follow the engine's events until cancelled."""
        import msgspec
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        try:
            while True:
                frames = await self.sock.recv_multipart()
                try:
                    batch = decoder.decode(frames[-1])
                except msgspec.DecodeError:
                    logger.warning("undecodable KV event batch on %s", self.endpoint)
                    continue
                for event in batch.events:
                    if isinstance(event, BlockStored):
                        self.index.on_stored(event.block_hashes, event.parent_block_hash, event.token_ids)
                    elif isinstance(event, BlockRemoved):
                        gone = self.index.on_removed(event.block_hashes)
                        if gone:
                            self.on_removed(gone)
                    elif isinstance(event, AllBlocksCleared):
                        self.on_cleared()
        finally:
            self.sock.close(linger=0)
