"""Device state: chained block hashes, the LRU prefix cache, and model residency with memory and host-RAM accounting.

Real tiny objects with exact expected outcomes: a 4-token block, a 4-block cache, and the tiny cluster of conftest
(fast devices: 10 GiB, 8 GiB host RAM; models a/b/c of 3/4/6 GiB footprint and 2/3/4 GiB weights).
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from fate_ray.state import (
    MAX_RUN_BLOCKS,
    DeviceState,
    PrefixCache,
    block_hashes,
    blocks_through,
    chain_blocks,
    snapshot_device,
)
from fate_ray.workload import Segment

B = 4  # tokens per block


def seg(key: int, tokens: int) -> Segment:
    return Segment(key, tokens)


# ---------------------------------------------------------------------------------------------------------------
# block_hashes


@pytest.mark.parametrize("tokens, blocks", [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (18, 4), (64, 16)])
def test_only_full_blocks_are_hashed(tokens, blocks):
    assert chain_blocks(block_hashes([seg(1, tokens)], B)) == blocks
    # The same tokens cut into several segments give as many blocks.
    assert chain_blocks(block_hashes([seg(1, tokens // 2), seg(2, tokens - tokens // 2)], B)) == blocks


def test_prompts_with_the_same_prefix_share_their_leading_blocks():
    # 10 tokens of system prompt, then 6 different tokens: blocks 0-1 hold only the prefix (one run), blocks
    # 2-3 (the next run) mix in the different tokens.
    one = block_hashes([seg(1, 10), seg(2, 6)], B)
    two = block_hashes([seg(1, 10), seg(3, 6)], B)
    assert [blocks_through(h) for h in one] == [blocks_through(h) for h in two] == [2, 4]
    assert one[0] == two[0] and one[1] != two[1]


def test_a_different_early_segment_changes_every_later_hash():
    # Blocks 1-3 hold the same tokens of segment 2, but a block hash stands for the whole prefix before it.
    one = block_hashes([seg(1, 4), seg(2, 12)], B)
    two = block_hashes([seg(9, 4), seg(2, 12)], B)
    assert all(x != y for x, y in zip(one, two, strict=True))


def test_a_trailing_partial_block_is_not_hashed_and_extending_the_prompt_keeps_the_hashes():
    full = block_hashes([seg(1, 16)], B)
    assert block_hashes([seg(1, 16), seg(2, 3)], B) == full
    assert block_hashes([seg(1, 16), seg(2, 4)], B)[:1] == full
    # A prompt's hashes are always a prefix of the hashes of any extension of it.
    short = block_hashes([seg(1, 6), seg(2, 5)], B)
    longer = block_hashes([seg(1, 6), seg(2, 5), seg(3, 9)], B)
    assert longer[: len(short)] == short and chain_blocks(longer) == 5


def test_segment_boundaries_inside_a_block_are_part_of_its_identity():
    # Block 1 (tokens 4-8) holds segment 1's tokens 4-6 and segment 2 or 3's first two tokens.
    base = block_hashes([seg(1, 6), seg(2, 2)], B)
    other = block_hashes([seg(1, 6), seg(3, 2)], B)
    assert base[0] == other[0] and base[1] != other[1]
    # Where the boundary falls matters too: 6+2 tokens is not 5+3 tokens.
    assert block_hashes([seg(1, 5), seg(2, 3)], B)[1] != base[1]
    # Two keys never give the hashes of one segment of the same length.
    assert block_hashes([seg(1, 2), seg(2, 2)], B) != block_hashes([seg(1, 4)], B)


def test_hashes_are_the_same_on_every_call_and_depend_on_the_block_size():
    segments = [seg(11, 13), seg(12, 19)]
    assert block_hashes(segments, B) == block_hashes(list(segments), B)
    assert chain_blocks(block_hashes(segments, 16)) == 2
    assert block_hashes(segments, 16)[0] not in block_hashes(segments, B)


def test_hashes_are_the_same_after_the_bounded_memo_forgot_their_segments():
    prompt = [seg(1, 10), seg(2, 7), seg(3, 40)]
    first = block_hashes(prompt, B)
    for k in range(10_000):  # far more distinct segments (each workflow's outputs are new) than the memo keeps
        block_hashes([seg(100 + k, 5)], B)
    assert block_hashes(prompt, B) == first


# ---------------------------------------------------------------------------------------------------------------
# PrefixCache (capacity in blocks of B = 4 tokens)
#
# A cache only ever receives whole chains (a prompt's runs from its first block on), so it holds a run only with
# its prefix; the tests below keep to that contract. One segment of n blocks is one run of n blocks.


def test_a_run_stands_for_its_whole_prefix_and_knows_its_block_count():
    a = block_hashes([seg(1, 8), seg(2, 6)], B)  # blocks: [1 1 1 1] [1 1 1 1] [2 2 2 2] + a partial [2 2]
    assert [blocks_through(h) for h in a] == [2, 3]  # a run of the two blocks inside seg 1, then the one into seg 2
    assert chain_blocks(a) == 3 and chain_blocks(()) == 0
    assert block_hashes([seg(1, 8)], B) == a[:1]
    long = block_hashes([seg(3, 4 * (MAX_RUN_BLOCKS + 5))], B)  # a long segment is cut into runs of at most 32
    assert [blocks_through(h) for h in long] == [MAX_RUN_BLOCKS, MAX_RUN_BLOCKS + 5]


def test_prefix_cache_ages_a_prompt_tail_first_and_evicts_least_recently_used_runs():
    cache = PrefixCache(5)
    first = block_hashes([seg(1, 8), seg(2, 4), seg(3, 4)], B)  # runs of 2, 1, 1 blocks
    assert cache.insert(first) == 0
    assert cache.runs() == first[::-1]  # least recently used first: the tail is the oldest
    second = block_hashes([seg(4, 8)], B)  # one run of 2 blocks: the first prompt's tail run goes
    assert cache.insert(second) == 1
    assert cache.runs() == (first[1], first[0], second[0])
    assert len(cache) == 5
    assert cache.insert(first[:1]) == 0  # a prompt that only shares the first run: a touch
    assert cache.runs() == (first[1], second[0], first[0])
    third = block_hashes([seg(5, 12)], B)  # 3 blocks: both of the least recent runs go
    assert cache.insert(third) == 3
    assert cache.runs() == (first[0], third[0]) and len(cache) == 5
    # What survives of each prompt is its head.
    assert [cache.match_blocks(p) for p in (first, second, third)] == [2, 0, 3]


def test_a_prompt_longer_than_the_cache_keeps_its_first_runs():
    cache = PrefixCache(40)
    long = block_hashes([seg(3, 4 * 70)], B)  # runs of 32, 32 and 6 blocks
    assert cache.insert(long) == 38
    assert cache.match_blocks(long) == 32


def test_prefix_cache_built_from_a_report_keeps_the_newest_runs_and_copies_are_independent():
    runs = [block_hashes([seg(k, 4)], B)[0] for k in range(6)]  # six one-block prompts
    cache = PrefixCache(4, runs)  # given least recently used first
    assert cache.runs() == tuple(runs[2:])
    twin = cache.copy()
    assert twin.runs() == tuple(runs[2:])
    extra = block_hashes([seg(9, 4)], B)
    twin.insert(extra)
    assert cache.runs() == tuple(runs[2:])
    assert twin.runs() == (*runs[3:], extra[0])


def test_match_blocks_counts_the_shared_leading_blocks_of_real_prompts():
    cached = block_hashes([seg(1, 8), seg(2, 8)], B)  # 4 blocks in two runs
    cache = PrefixCache(4)
    cache.insert(cached)
    assert cache.match_blocks(cached) == 4
    assert cache.match_blocks(block_hashes([seg(1, 8), seg(2, 8), seg(3, 8)], B)) == 4
    assert cache.match_blocks(block_hashes([seg(1, 8), seg(3, 8)], B)) == 2  # diverges after block 2
    # A segment key stands for its tokens, so the same key at another length is other text: no shared run.
    assert cache.match_blocks(block_hashes([seg(1, 6), seg(2, 10)], B)) == 0
    assert cache.match_blocks(block_hashes([seg(9, 16)], B)) == 0
    assert cache.match_blocks(()) == 0
    # Matching is a query: it does not refresh recency.
    cache.match_blocks(cached)
    cache.insert(block_hashes([seg(5, 4)], B))
    assert cache.match_blocks(cached) == 2  # the tail run (2 blocks) went for the new block


def test_prefix_cache_agrees_with_a_plain_lru_over_many_prompts():
    """Random prompts over a few shared prefixes, many more touches than capacity: the optimised cache must keep
    exactly the runs a straightforward LRU of weighted runs (tail of each prompt aged first) keeps."""
    rng = random.Random(5)
    cache, reference, size = PrefixCache(12), OrderedDict(), {}
    for _ in range(400):
        prompt = [seg(rng.randrange(3), 4 * rng.randrange(1, 4)), seg(rng.randrange(6), 4 * rng.randrange(0, 4))]
        hashes = block_hashes(prompt, B)
        expected_hit = 0
        for h in hashes:
            if h not in reference:
                break
            expected_hit = blocks_through(h)
        assert cache.match_blocks(hashes) == expected_hit
        before = 0
        for h in hashes:
            size[h], before = blocks_through(h) - before, blocks_through(h)
        for h in reversed(hashes):
            reference[h] = None
            reference.move_to_end(h)
        evicted = 0
        while sum(size[h] for h in reference) > 12:
            evicted += size[reference.popitem(last=False)[0]]
        assert cache.insert(hashes) == evicted
        assert cache.runs() == tuple(reference)


# ---------------------------------------------------------------------------------------------------------------
# DeviceState residency on the tiny cluster


def fast_device(cluster) -> DeviceState:
    return DeviceState.empty(cluster, cluster.devices[0])  # n1/gpu0: 10 GiB, 8 GiB host RAM


def test_loading_a_model_makes_it_active_and_uses_its_footprint(tiny_cluster):
    dev = fast_device(tiny_cluster)
    assert dev.state_of("a") == "ABSENT" and dev.used_gib() == 0
    plan = dev.plan_activation("a")
    assert (plan.kind, plan.evict, plan.feasible) == ("load", (), True)
    assert dev.activate("a", now_s=1.0) == "load"
    assert dev.state_of("a") == "ACTIVE"
    assert dev.used_gib() == 3
    assert dev.caches["a"].capacity_blocks == 256
    assert dev.plan_activation("a").kind == "resident"
    assert dev.activate("a", now_s=2.0) == "resident"
    assert dev.activate("b", now_s=3.0) == "load"
    assert dev.used_gib() == 7


def test_activation_evicts_the_least_recently_used_idle_model(tiny_cluster):
    dev = fast_device(tiny_cluster)
    dev.activate("a", now_s=1.0)
    dev.activate("b", now_s=2.0)
    dev.activate("a", now_s=3.0)  # a used again: b is now the least recently used
    plan = dev.plan_activation("c")  # 6 GiB with 3 free: one model must go
    assert (plan.kind, plan.evict, plan.feasible) == ("load", ("b",), True)
    dev.activate("c", now_s=4.0, evict=plan.evict)
    assert dev.residency == {"a": "ACTIVE", "b": "SLEEPING", "c": "ACTIVE"}
    assert dev.used_gib() == 9 <= dev.memory_gib


def test_activation_skips_busy_models_and_refuses_when_busy_models_hold_the_memory(tiny_cluster):
    dev = fast_device(tiny_cluster)
    dev.activate("a", now_s=1.0)
    dev.activate("b", now_s=2.0)
    dev.shard_started("a")  # a is the LRU model but runs a shard
    assert dev.plan_activation("c").evict == ("b",)
    dev.shard_started("b")
    plan = dev.plan_activation("c")
    assert plan.feasible is False
    dev.shard_ended("a", now_s=5.0)
    plan = dev.plan_activation("c")
    assert (plan.evict, plan.feasible) == (("a",), True)


def test_deactivation_sleeps_the_model_and_drops_its_kv_cache(tiny_cluster):
    dev = fast_device(tiny_cluster)
    dev.activate("a", now_s=1.0)
    dev.insert_blocks("a", [1, 2, 3])
    assert dev.cached_tokens("a", [1, 2, 3]) == 12
    dev.deactivate("a")
    assert dev.state_of("a") == "SLEEPING"
    assert dev.used_gib() == 0
    assert "a" not in dev.caches and dev.cached_tokens("a", [1, 2, 3]) == 0
    assert dev.plan_activation("a").kind == "wake"
    assert dev.activate("a", now_s=2.0) == "wake"
    assert dev.cached_tokens("a", [1, 2, 3]) == 0  # woken with an empty cache


def test_a_device_that_cannot_sleep_unloads(make_cluster):
    cluster = make_cluster(fast={"supports_sleep": False, "host_offload_gib": 0})
    dev = fast_device(cluster)
    dev.activate("a", now_s=1.0)
    dev.deactivate("a")
    assert dev.state_of("a") == "ABSENT" and "a" not in dev.residency
    assert dev.plan_activation("a").kind == "load"


def test_a_model_too_big_for_host_ram_is_unloaded(make_cluster):
    dev = fast_device(make_cluster(fast={"host_offload_gib": 2.5}))  # a's 2 GiB weights fit, b's 3 do not
    dev.activate("a", now_s=1.0)
    dev.activate("b", now_s=2.0)
    dev.deactivate("a")
    dev.deactivate("b")
    assert dev.residency == {"a": "SLEEPING"}


def test_host_ram_limit_drops_the_oldest_sleeping_model(tiny_cluster):
    dev = fast_device(tiny_cluster)  # 8 GiB of host RAM for weights of 2 (a), 3 (b), 4 (c)
    dev.activate("a", now_s=1.0)
    dev.activate("b", now_s=2.0)
    dev.deactivate("a")
    dev.deactivate("b")
    assert dev.residency == {"a": "SLEEPING", "b": "SLEEPING"}  # 5 GiB
    dev.activate("c", now_s=3.0)
    dev.deactivate("c")  # 9 GiB would sleep: a, used longest ago, goes
    assert dev.residency == {"b": "SLEEPING", "c": "SLEEPING"}
    assert dev.activate("a", now_s=4.0) == "load"
    assert dev.activate("b", now_s=5.0) == "wake"


def test_replace_adopts_a_workers_report(tiny_cluster):
    dev = fast_device(tiny_cluster)
    dev.activate("a", now_s=1.0)
    held = block_hashes([seg(7, 8)], dev.cluster.block_tokens)  # 2 blocks of 4 tokens
    dev.replace({"b": "ACTIVE", "c": "SLEEPING", "a": "ABSENT"}, {"b": held})
    assert dev.residency == {"b": "ACTIVE", "c": "SLEEPING"}
    assert dev.cached_tokens("b", block_hashes([seg(7, 8), seg(8, 4)], dev.cluster.block_tokens)) == 8
    assert set(dev.caches) == {"b"}


def test_a_snapshot_does_not_change_when_the_device_does(tiny_cluster):
    dev = fast_device(tiny_cluster)
    dev.activate("a", now_s=1.0)
    dev.shard_started("a")
    snap = snapshot_device(dev, concurrency=2, alive=True, free_at_s=3.0, running_shards=1, queued_requests=4)
    dev.activate("b", now_s=2.0)
    dev.shard_ended("a", now_s=2.0)
    assert dict(snap.residency) == {"a": "ACTIVE"}
    assert snap.state_of("b") == "ABSENT"
    assert snap.busy_models == frozenset({"a"})
    with pytest.raises(TypeError):
        snap.residency["c"] = "ACTIVE"  # type: ignore[index]
