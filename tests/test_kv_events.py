"""vLLM's KV events mapped to the planner's block keys through token ids (fate_ray/engines/kv_events.py): the
real engine's events are exercised in test_vllm_engine.py; here the mapping's rules, on exact small chains."""

from __future__ import annotations

from fate_ray.engines.kv_events import KvBlockIndex, chain_ids, runs_by_block
from fate_ray.state import block_hashes, blocks_through
from fate_ray.workload import Segment

BLOCK = 4


def test_equal_token_prefixes_have_equal_chain_ids_and_a_continued_chain_matches_the_whole():
    ids = list(range(100, 112))  # three full blocks
    whole = chain_ids(ids, BLOCK)
    assert len(whole) == 3
    assert chain_ids(ids[:8], BLOCK) == whole[:2]
    assert chain_ids(ids[8:], BLOCK, parent=whole[1]) == whole[2:]
    assert chain_ids([*ids[:4], 0, 0, 0, 0], BLOCK)[1] != whole[1]
    assert chain_ids(ids[:11], BLOCK) == whole[:2]  # a trailing partial block has no id


def test_every_block_is_covered_by_the_planner_run_that_ends_at_or_after_it():
    runs = block_hashes((Segment(1, 9), Segment(2, 7)), BLOCK)  # 16 tokens: blocks end inside both segments
    covering = runs_by_block(runs)
    assert len(covering) == 4
    assert [blocks_through(r) for r in covering] == sorted(blocks_through(r) for r in covering)
    assert covering[-1] == runs[-1]


def test_a_block_vllm_removes_names_the_planner_run_it_belonged_to():
    index = KvBlockIndex(BLOCK)
    prompt = list(range(50, 62))  # 12 tokens, the first 3 blocks of the request
    output = [7, 8, 9, 10]
    runs = block_hashes((Segment(11, 12), Segment(22, 4)), BLOCK)
    # vLLM stores the prompt's blocks while it prefills, then the output's block; the request then finishes.
    index.on_stored([901, 902, 903], None, prompt)
    index.on_stored([904], 903, output)
    index.register(prompt + output, runs)
    assert index.stored == 4
    # It evicts the last block first (the tail of the chain): the run holding it is no longer whole.
    assert index.on_removed([904]) == [runs_by_block(runs)[3]]
    assert index.on_removed([904]) == []  # a second removal of the same block names nothing
    assert index.on_removed([12345]) == []  # a block stored before we listened is ignored
    assert index.removed == 3


def test_a_chain_whose_parent_was_never_seen_is_not_followed():
    index = KvBlockIndex(BLOCK)
    index.on_stored([5], 4, [1, 2, 3, 4])  # parent 4 unknown
    index.register([9, 9, 9, 9, 1, 2, 3, 4], block_hashes((Segment(3, 8),), BLOCK))
    assert index.on_removed([5]) == []
