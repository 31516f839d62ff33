"""A long-lived planner does not grow with the history of completed workflows: once finished workflows are
released, what it holds besides its belief of the engines' prefix caches (bounded by their KV capacity) stays flat.
It once grew by about 30 memoised segment hashes (12 KiB) per workflow ever submitted.

Measured as the load bench does, in fresh processes: in this one, the process-wide memo already holds entries
allocated before tracing started, and replacing them would read as growth."""

from __future__ import annotations

from fate_ray.bench.load import memory_load


def test_planner_memory_besides_the_prefix_cache_belief_stays_flat_as_workflows_complete(mixed_cluster):
    memory = memory_load(mixed_cluster, "round_robin", 300)
    assert memory["kept_workflows"] == 0
    half, end = memory["marks"][-2:]
    assert (half["workflows"], end["workflows"]) == (150, 300)
    assert end["rest_mib"] <= 1.10 * half["rest_mib"], (half, end)
    assert end["rss_mib"] <= 1.10 * half["rss_mib"], (half, end)
    assert end["prefix_blocks_held"] <= end["prefix_blocks_capacity"]
