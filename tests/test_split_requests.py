"""`split_requests`: how FATE turns request counts per device into concrete request indices.

Real device state on the tiny cluster (conftest): blocks of 4 tokens, model `a` on the fast devices G0 = n1/gpu0
and G1 = n1/gpu1 (and the slow S2 = n2/gpu2). A request's prompt is its own 16-token segment (4 blocks) unless a
test says otherwise, made of four one-block segments so that a device "caches k blocks" of a request when
`insert_blocks` gave it that prompt's first k runs (block_hashes hashes a run of blocks per segment).
"""

from __future__ import annotations

import itertools

import pytest

from fate_ray.cost import RequestShape
from fate_ray.policies.base import ReadyStage
from fate_ray.policies.fate.planner import split_requests
from fate_ray.state import DeviceState, block_hashes, snapshot_device
from fate_ray.workload import Segment

B = 4
G0, G1, S2 = "n1/gpu0", "n1/gpu1", "n2/gpu2"


def prompt(i: int) -> tuple[Segment, ...]:
    return tuple(Segment(100 + 10 * i + j, 4) for j in range(4))


def stage(indices=(0, 1, 2, 3), prompts=None) -> ReadyStage:
    prompts = prompts or {i: prompt(i) for i in indices}
    reqs = tuple(RequestShape(sum(s.tokens for s in prompts[i]), block_hashes(prompts[i], B), 10) for i in indices)
    return ReadyStage(("w", "s"), "a", tuple(indices), reqs, True, 0.0, 0.0)


def devices(cluster, cached: dict[str, list[tuple[tuple[Segment, ...], int]]] | None = None) -> dict:
    """Snapshots of G0, G1 and S2 with model `a` ACTIVE; `cached[device] = [(prompt, blocks), ...]`."""
    out = {}
    for d in cluster.devices[:3]:
        state = DeviceState.empty(cluster, d)
        state.activate("a", now_s=0.0)
        for segments, k in (cached or {}).get(d.device_id, []):
            state.insert_blocks("a", block_hashes(segments, B)[:k])
        concurrency = cluster.device_types[d.type].concurrency
        out[d.device_id] = snapshot_device(state, concurrency=concurrency, alive=True, free_at_s=0.0, running_shards=0,
                                           queued_requests=0)
    return out


def assert_partition(split: dict, counts: dict, indices) -> None:
    """Every device got exactly its count (none listed with zero) and every request went to exactly one device."""
    assert {d: len(idx) for d, idx in split.items()} == {d: n for d, n in counts.items() if n}
    placed = [i for idx in split.values() for i in idx]
    assert sorted(placed) == sorted(indices)


@pytest.mark.parametrize("counts", [{G0: 6}, {G0: 3, G1: 3}, {G0: 5, G1: 1}, {G0: 1, G1: 2, S2: 3},
                                    {G0: 0, G1: 6}, {S2: 2, G0: 2, G1: 2}])
def test_counts_are_honoured_and_every_request_is_placed_once_without_caches(tiny_cluster, counts):
    """A device listed with count 0 gets nothing and is left out of the result."""
    s = stage(range(6))
    assert_partition(split_requests(s, counts, devices(tiny_cluster), B), counts, range(6))


def test_counts_are_honoured_and_every_request_is_placed_once_with_scattered_caches(tiny_cluster):
    """Whatever the caches pull towards, every count is met exactly: each request has 0-4 blocks cached on each
    device, and every split of 6 requests over the three devices is tried."""
    s = stage(range(6))
    cached = {d: [(prompt(i), (i * 7 + n) % 5) for i in range(6)] for n, d in enumerate((G0, G1, S2))}
    devs = devices(tiny_cluster, cached)
    for a, b in itertools.product(range(7), repeat=2):
        if a + b <= 6:
            counts = {G0: a, G1: b, S2: 6 - a - b}
            assert_partition(split_requests(s, counts, devs, B), counts, range(6))


def test_the_request_cached_on_a_device_goes_there(tiny_cluster):
    """Request 2's prompt is cached on G1, which takes one request: it gets request 2, G0 the other three."""
    devs = devices(tiny_cluster, {G1: [(prompt(2), 4)]})
    assert split_requests(stage(), {G0: 3, G1: 1}, devs, B) == {G0: (0, 1, 3), G1: (2,)}


def test_requests_follow_their_context_against_index_order(tiny_cluster):
    """A child continuing a map: items 0 and 1 ran on G1, items 2 and 3 on G0; each follows its own context."""
    devs = devices(tiny_cluster, {G0: [(prompt(2), 4), (prompt(3), 4)], G1: [(prompt(0), 4), (prompt(1), 4)]})
    assert split_requests(stage(), {G0: 2, G1: 2}, devs, B) == {G0: (2, 3), G1: (0, 1)}


def test_indices_are_the_stages_own_not_positions(tiny_cluster):
    """A stage re-planned with requests 2, 5 and 7 left: request 5 (the second position) is the one cached on S2."""
    devs = devices(tiny_cluster, {S2: [(prompt(5), 4)]})
    assert split_requests(stage((2, 5, 7)), {G0: 2, S2: 1}, devs, B) == {G0: (2, 7), S2: (5,)}


def test_when_the_count_is_short_the_longest_cached_prefix_wins(tiny_cluster):
    """G1 caches 1, 4 and 2 blocks of requests 0, 1 and 2 but takes one request: request 1, the deepest hit."""
    devs = devices(tiny_cluster, {G1: [(prompt(0), 1), (prompt(1), 4), (prompt(2), 2)]})
    assert split_requests(stage((0, 1, 2)), {G0: 2, G1: 1}, devs, B) == {G0: (0, 2), G1: (1,)}


def test_the_strongest_preference_chooses_first_not_the_largest_hit(tiny_cluster):
    """Request 0 is cached in full on both devices (no preference); request 1 has 2 blocks on G1 only. Request 1
    chooses first and takes G1, although request 0 has more cached tokens there and comes first by index."""
    devs = devices(tiny_cluster, {G0: [(prompt(0), 4)], G1: [(prompt(0), 4), (prompt(1), 2)]})
    assert split_requests(stage((0, 1)), {G1: 1, G0: 1}, devs, B) == {G0: (0,), G1: (1,)}


def test_a_shared_system_prompt_fills_its_device_then_the_rest_spill(tiny_cluster):
    """All four prompts start with the same 8-token system prompt, cached (2 blocks) on G0 only: G0 takes as many
    as its count allows, in index order (equal preference), and the rest go to G1."""
    prompts = {i: (Segment(1, 8), Segment(100 + i, 8)) for i in range(4)}
    devs = devices(tiny_cluster, {G0: [(prompts[0], 2)]})
    assert split_requests(stage(prompts=prompts), {G0: 2, G1: 2}, devs, B) == {G0: (0, 1), G1: (2, 3)}


def test_without_any_cache_equal_counts_alternate_between_devices(tiny_cluster):
    """No hits anywhere: each request goes to the device with the most requests left (first listed on a tie)."""
    assert split_requests(stage(), {G1: 2, G0: 2}, devices(tiny_cluster), B) == {G1: (0, 2), G0: (1, 3)}


def test_a_device_without_the_model_counts_as_no_hit(tiny_cluster):
    """S2 never activated model `a` (no cache at all); G0 caches request 3: request 3 goes to G0."""
    devs = devices(tiny_cluster, {G0: [(prompt(3), 4)]})
    bare = DeviceState.empty(tiny_cluster, tiny_cluster.devices[2])
    devs[S2] = snapshot_device(bare, concurrency=1, alive=True, free_at_s=0.0, running_shards=0, queued_requests=0)
    assert split_requests(stage(), {S2: 3, G0: 1}, devs, B) == {S2: (0, 1, 2), G0: (3,)}


def test_a_single_device_takes_every_request_whatever_the_caches(tiny_cluster):
    devs = devices(tiny_cluster, {G1: [(prompt(0), 4)]})
    assert split_requests(stage(), {G0: 4}, devs, B) == {G0: (0, 1, 2, 3)}


def test_equal_inputs_give_equal_splits(tiny_cluster):
    """Two calls, and a call on devices rebuilt from scratch with the same caches, give the same split."""
    cached = {G0: [(prompt(0), 2), (prompt(4), 3)], G1: [(prompt(0), 2), (prompt(5), 1)], S2: [(prompt(1), 4)]}
    counts = {G0: 2, G1: 2, S2: 2}
    first = split_requests(stage(range(6)), counts, devices(tiny_cluster, cached), B)
    assert first == split_requests(stage(range(6)), counts, devices(tiny_cluster, cached), B)
    assert first == split_requests(stage(range(6)), dict(counts), devices(tiny_cluster, cached), B)
    # Requests 1, 4 and 5 (one caching device each) choose first; request 0 (equal hits on G0 and G1) ties to G0.
    assert first == {G0: (0, 4), G1: (2, 5), S2: (1, 3)}
