"""One engine's KV-cache memory: blocks held by running requests and cached prefix blocks share one pool.

Like vLLM's block pool: a full block is identified by its chained hash (`fate_ray.state.block_hashes`); blocks in
use by a running request are pinned (reference count > 0); a finished request's blocks stay cached with count 0
and are evicted least recently used first when a new request needs memory. Blocks a request has not filled yet
(the prompt's partial tail, the tokens it is generating) are private: counted, not hashed.

NOTE: a finished request's blocks are freed tail first, as vLLM frees them in reverse order, so eviction takes a
prompt's extension before its prefix and a prefix match can stop at the first missing block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class KvPool:
    __slots__ = ("capacity_blocks", "refs", "lru", "private_blocks", "evicted")

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self.refs: dict[int, int] = {}  # hashed blocks in memory -> running requests using them
        self.lru: OrderedDict[int, None] = OrderedDict()  # blocks with no user, least recently used first
        self.private_blocks = 0
        self.evicted: list[int] = []  # since the last report: what the planner's belief should forget

    @property
    def used_blocks(self) -> int:
        return len(self.refs) + self.private_blocks

    @property
    def free_blocks(self) -> int:
        """Blocks a new user can get: unused ones plus cached ones nobody uses (evictable)."""
        return self.capacity_blocks - self.used_blocks + len(self.lru)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` in memory (pinned or cached)."""
        n = 0
        refs = self.refs
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def admit(self, hashes: Sequence[int], matched: int, private: int) -> bool:
        """Pin the first `matched` blocks, add the rest and `private` blocks, evicting cached ones as needed;
        False (nothing changes) when the pool cannot hold them."""
        new = len(hashes) - matched
        reusable = sum(1 for h in hashes[:matched] if self.refs[h] == 0)
        if new + private > self.free_blocks - reusable:
            return False
        for h in hashes[:matched]:
            if self.refs[h] == 0:
                del self.lru[h]
            self.refs[h] += 1
        self.make_room(new + private)
        refs, lru = self.refs, self.lru
        for h in hashes[matched:]:
            n = refs.get(h)
            if n == 0:  # cached past a missing block (rare): pin it, so eviction cannot take it
                del lru[h]
            refs[h] = (n or 0) + 1
        self.private_blocks += private
        return True

    def make_room(self, blocks: int) -> bool:
        """Evict cached blocks until `blocks` more fit; False if even evicting every cached block is not enough."""
        over = self.used_blocks + blocks - self.capacity_blocks
        while over > 0 and self.lru:
            h, _ = self.lru.popitem(last=False)
            del self.refs[h]
            self.evicted.append(h)
            over -= 1
        return over <= 0

    def release(self, hashes: Sequence[int], private: int, keep: Sequence[int] = ()) -> None:
        """A request ended or was preempted: unpin its blocks, drop its private ones, and cache `keep` (the full
        blocks it filled while running, now hashed) if memory allows. The chain is touched tail first, so its
        head ends up most recently used and is evicted last."""
        self.private_blocks -= private
        refs, lru = self.refs, self.lru
        for h in hashes:
            refs[h] -= 1
        for h in reversed((*hashes, *keep)):
            n = refs.get(h)
            if n is None:  # a block it filled: cache it if there is room
                if not self.make_room(1):
                    continue
                refs[h] = 0
                lru[h] = None
            elif n == 0:
                if h in lru:
                    lru.move_to_end(h)
                else:
                    lru[h] = None

    def take_evicted(self) -> list[int]:
        out, self.evicted = self.evicted, []
        return out

    def cached(self) -> tuple[int, ...]:
        return tuple(self.refs)
