"""The load bench's simulator and memory parts at a small scale: nothing lost, nothing duplicated, and a planner
that releases finished workflows keeps none of them (its figures are benchmarks, not asserted here)."""

from __future__ import annotations

from rich.console import Console

from fate_ray.bench.load import run_load


def test_the_load_bench_loses_nothing_and_keeps_no_finished_workflow(mixed_cluster, tmp_path):
    res = run_load(mixed_cluster, ["fate", "round_robin"], tmp_path, Console(quiet=True), sim_workflows=60,
                   memory_workflows=200, ray=False)
    for policy, row in res["policies"].items():
        assert row["simulator"]["completed"] == 60, policy
        assert row["simulator"]["lost"] == row["simulator"]["duplicated"] == 0, policy
        assert row["memory"]["kept_workflows"] == 0, policy
        assert row["memory"]["memory_mib_at_end"] > 0
    assert (tmp_path / "results.json").exists()
