"""One engine's KV-cache memory: blocks held by running requests and cached prefix blocks share one pool.

Like vLLM's block pool: full blocks are identified by their chained hashes (`fate_ray.state.block_hashes`, a run of
blocks per hash, its size in blocks known from the chain); blocks in use by a running request are pinned
(reference count > 0); a finished request's blocks stay cached with count 0 and are evicted least recently used
first when a new request needs memory. Blocks a request has not filled yet (the prompt's partial tail, the tokens
it is generating) are private: counted, not hashed.

NOTE: a finished request's runs are freed tail first, as vLLM frees blocks in reverse order, so eviction takes a
prompt's extension before its prefix and a prefix match can stop at the first missing run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from fate_ray.state import run_sizes


class KvPool:
    __slots__ = ("capacity_blocks", "refs", "size", "lru", "lru_blocks", "hashed_blocks", "private_blocks",
                 "evicted")

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self.refs: dict[int, int] = {}  # runs in memory -> running requests using them
        self.size: dict[int, int] = {}  # run -> its blocks
        self.lru: OrderedDict[int, None] = OrderedDict()  # runs with no user, least recently used first
        self.lru_blocks = 0  # their blocks: what eviction can free
        self.hashed_blocks = 0
        self.private_blocks = 0
        self.evicted: list[int] = []  # since the last report: what the planner's belief should forget

    @property
    def used_blocks(self) -> int:
        return self.hashed_blocks + self.private_blocks

    @property
    def free_blocks(self) -> int:
        """Blocks a new user can get: unused ones plus cached ones nobody uses (evictable)."""
        return self.capacity_blocks - self.used_blocks + self.lru_blocks

    def match(self, hashes: Sequence[int]) -> int:
        """Leading runs of `hashes` in memory (pinned or cached)."""
        n = 0
        refs = self.refs
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def admit(self, hashes: Sequence[int], matched: int, private: int) -> bool:
        """Pin the first `matched` runs, add the rest and `private` blocks, evicting cached runs as needed; False
        (nothing changes) when the pool cannot hold them."""
        refs, lru, size = self.refs, self.lru, self.size
        new_sizes = run_sizes(hashes, matched)
        new = sum(new_sizes)
        # NOTE: plain loops and one update of lru_blocks, not sum() over a generator and an update per run (a
        # fifth of admit's time, which runs for every request).
        reused = 0  # blocks of matched runs nobody uses: in free_blocks (evictable), but this admission pins them
        for h in hashes[:matched]:
            if refs[h] == 0:
                reused += size[h]
        if new + private > self.free_blocks - reused:
            return False
        for h in hashes[:matched]:
            if refs[h] == 0:
                del lru[h]
            refs[h] += 1
        self.lru_blocks -= reused
        self.make_room(new + private)
        for h, blocks in zip(hashes[matched:], new_sizes):
            n = refs.get(h)
            if n is None:
                size[h] = blocks
                self.hashed_blocks += blocks
            elif n == 0:  # cached past a missing run (rare): pin it, so eviction cannot take it
                del lru[h]
                self.lru_blocks -= size[h]
            refs[h] = (n or 0) + 1
        self.private_blocks += private
        return True

    def make_room(self, blocks: int) -> bool:
        """Evict cached runs until `blocks` more fit; False if even evicting every cached run is not enough."""
        over = self.used_blocks + blocks - self.capacity_blocks
        lru, refs, size = self.lru, self.refs, self.size
        while over > 0 and lru:
            h, _ = lru.popitem(last=False)
            del refs[h]
            freed = size.pop(h)
            self.hashed_blocks -= freed
            self.lru_blocks -= freed
            self.evicted.append(h)
            over -= freed
        return over <= 0

    def release(self, hashes: Sequence[int], private: int, keep: Sequence[int] = ()) -> None:
        """A request ended or was preempted: unpin its runs, drop its private blocks, and cache `keep` (the runs it
        filled while running, which continue `hashes`) if memory allows. The chain is touched tail first, so its
        head ends up most recently used and is evicted last."""
        self.private_blocks -= private
        refs, lru, size = self.refs, self.lru, self.size
        for h in hashes:
            refs[h] -= 1
        chain = (*hashes, *keep)
        sizes = run_sizes(chain, len(hashes)) if keep else []
        for pos in range(len(chain) - 1, -1, -1):
            h = chain[pos]
            n = refs.get(h)
            if n is None:  # a run it filled: cache it if there is room
                blocks = sizes[pos - len(hashes)]
                if not self.make_room(blocks):
                    continue
                refs[h] = 0
                size[h] = blocks
                self.hashed_blocks += blocks
                lru[h] = None
                self.lru_blocks += blocks
            elif n == 0:
                if h in lru:
                    lru.move_to_end(h)
                else:
                    lru[h] = None
                    self.lru_blocks += size[h]

    def take_evicted(self) -> list[int]:
        out, self.evicted = self.evicted, []
        return out

    def cached(self) -> tuple[int, ...]:
        return tuple(self.refs)
