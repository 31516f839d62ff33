"""`fate-ray bench` aggregation and output files.

`aggregate` is fed hand-built per-run records (`JobResult`s) whose ratios to round_robin are chosen by hand; the
files are those of one real smoke-suite run (the self-consistency example, fate and round_robin, one seed) on the
shipped mixed cluster, checked against the results.json / results.csv contract.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from fate_ray.bench import run_suite
from fate_ray.bench.runner import NORMALISER, JobResult, aggregate
from fate_ray.sim.simulator import percentile

ROOT = Path(__file__).resolve().parents[1]

TOP_KEYS = {"suite", "seeds", "instances", "policies", "per_instance"}
POLICY_KEYS = {"normalized_makespan", "normalized_p95", "makespan_s", "p95_s", "lb_ratio", "prefix_hit_rate",
               "model_loads", "plan_ms_p95"}
ROW_KEYS = {"instance", "seed", "policy", "makespan_s", "p95_s", "lb_s"}
RR = NORMALISER


def run(instance: str, seed: int, policy: str, makespan_s: float, p95_s: float, *, lb_s: float = 10.0,
        group: str = "", workflows: int = 2, completed: int = 2, loads: int = 0, plan_ms: tuple = (),
        prompt_tokens: int = 0, cached_tokens: int = 0) -> JobResult:
    """One (instance, seed, policy) run's record, as `run_job` builds it."""
    row = {"instance": instance, "group": group, "seed": seed, "policy": policy, "workflows": workflows,
           "completed": completed, "failed": workflows - completed, "makespan_s": makespan_s, "p95_s": p95_s,
           "lb_s": lb_s, "prefix_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
           "model_loads": loads, "model_wakes": 0, "events": 10, "sim_wall_s": 0.01,
           "plan_ms_p95": percentile(plan_ms, 95)}
    return JobResult(row, list(plan_ms), prompt_tokens=prompt_tokens, cached_tokens=cached_tokens)


# Two (instance, seed) pairs with the same seed, listed out of order: the pairing must be by (instance, seed).
RUNS = [
    run("i2", 0, "x", 80, 10, lb_s=10), run("i1", 0, RR, 100, 40, lb_s=25), run("i1", 0, "y", 25, 40, lb_s=25),
    run("i2", 0, RR, 40, 20, lb_s=10), run("i1", 0, "x", 50, 20, lb_s=25), run("i2", 0, "y", 40, 80, lb_s=10),
]


def test_normalised_figures_are_geometric_means_of_ratios_to_round_robin():
    """x: makespan ratios 0.5 and 2.0 -> 1.0, P95 ratios 0.5 and 0.5 -> 0.5; y: makespan 0.25 and 1.0 -> 0.5,
    P95 1.0 and 4.0 -> 2.0; round_robin exactly 1.0."""
    summary = aggregate(RUNS, [RR, "x", "y"])["policies"]
    assert list(summary) == [RR, "x", "y"]
    assert summary[RR]["normalized_makespan"] == 1.0 and summary[RR]["normalized_p95"] == 1.0
    assert summary["x"]["normalized_makespan"] == pytest.approx(1.0)
    assert summary["x"]["normalized_p95"] == pytest.approx(0.5)
    assert summary["y"]["normalized_makespan"] == pytest.approx(0.5)
    assert summary["y"]["normalized_p95"] == pytest.approx(2.0)


def test_raw_figures_are_arithmetic_means_and_lb_ratio_a_geometric_mean():
    """x: mean makespan (50 + 80) / 2, mean P95 (20 + 10) / 2; makespan/LB 50/25 = 2 and 80/10 = 8 -> 4."""
    x = aggregate(RUNS, [RR, "x", "y"])["policies"]["x"]
    assert (x["makespan_s"], x["p95_s"], x["runs"]) == (65.0, 15.0, 2)
    assert x["lb_ratio"] == pytest.approx(4.0)
    assert aggregate(RUNS, [RR])["policies"][RR]["lb_ratio"] == pytest.approx(4.0)  # 100/25 and 40/10


def test_a_run_with_failed_workflows_is_left_out_of_the_normalised_figures_only():
    """x also runs pair (i3, 0) and completes 1 of 2 workflows in 1 s: its ratio 0.01 would pull the geometric mean
    down, so it is left out there, but it counts in the raw means and in failed_workflows."""
    runs = [*RUNS, run("i3", 0, RR, 100, 100), run("i3", 0, "x", 1, 1, completed=1)]
    x = aggregate(runs, [RR, "x"])["policies"]["x"]
    assert x["normalized_makespan"] == pytest.approx(1.0)
    assert x["normalized_p95"] == pytest.approx(0.5)
    assert (x["failed_workflows"], x["runs"]) == (1, 3)
    assert x["makespan_s"] == pytest.approx((50 + 80 + 1) / 3)


def test_a_policy_without_a_round_robin_run_to_compare_with_has_no_normalised_figure():
    summary = aggregate([run("i1", 0, "x", 50, 20)], [RR, "x"])["policies"]
    assert math.isnan(summary["x"]["normalized_makespan"]) and math.isnan(summary["x"]["normalized_p95"])
    assert summary[RR]["runs"] == 0 and summary["x"]["makespan_s"] == 50.0


def test_prefix_hits_are_pooled_over_tokens_and_plan_times_over_rounds():
    """Hit rate = all cached tokens / all prompt tokens (50 + 50) / (100 + 300) = 0.25, not the mean of 0.5 and
    1/6; planning P95 over both runs' rounds 1..5 ms is 4.8 ms; loads are a mean per run."""
    runs = [run("i1", 0, RR, 10, 10, loads=3, plan_ms=(1.0, 2.0), prompt_tokens=100, cached_tokens=50),
            run("i1", 1, RR, 10, 10, loads=6, plan_ms=(5.0, 3.0, 4.0), prompt_tokens=300, cached_tokens=50)]
    rr = aggregate(runs, [RR])["policies"][RR]
    assert rr["prefix_hit_rate"] == 0.25
    assert rr["plan_ms_p95"] == pytest.approx(4.8)
    assert rr["model_loads"] == 4.5


def test_groups_are_normalised_within_themselves():
    """x halves round_robin's makespan in group g1 and doubles it in g2: 1.0 overall, 0.5 and 2.0 by group."""
    runs = [run("a", 0, RR, 100, 10, group="g1"), run("a", 0, "x", 50, 10, group="g1"),
            run("b", 0, RR, 100, 10, group="g2"), run("b", 0, "x", 200, 10, group="g2")]
    result = aggregate(runs, [RR, "x"])
    assert result["policies"]["x"]["normalized_makespan"] == pytest.approx(1.0)
    assert list(result["by_group"]) == ["g1", "g2"]
    assert result["by_group"]["g1"]["x"]["normalized_makespan"] == pytest.approx(0.5)
    assert result["by_group"]["g2"]["x"]["normalized_makespan"] == pytest.approx(2.0)
    assert result["by_group"]["g2"][RR]["normalized_makespan"] == 1.0
    assert aggregate(RUNS, [RR, "x"])["by_group"] == {}  # no groups, no per-group tables


def test_a_round_robin_run_that_completed_nothing_is_not_a_normaliser():
    """Its makespan would be 0 (a division by zero) or cover fewer workflows than the policy's: the pair is left out."""
    runs = [run("i1", 0, RR, 100, 40), run("i1", 0, "x", 50, 20),
            run("i2", 0, RR, 0.0, 0.0, completed=0), run("i2", 0, "x", 80, 10)]
    x = aggregate(runs, [RR, "x"])["policies"]["x"]
    assert x["normalized_makespan"] == pytest.approx(0.5)  # pair (i1, 0) only


# ---------------------------------------------------------------------------------------------------------------
# results.json / results.csv of a real run


@pytest.fixture(scope="module")
def bench(mixed_cluster, tmp_path_factory):
    """One smoke-suite run of the self-consistency example: 2 instances x 1 seed x (round_robin, fate), ~1 s."""
    out = tmp_path_factory.mktemp("bench")
    example = str(ROOT / "workflows" / "self_consistency.yaml")
    results = run_suite("smoke", mixed_cluster, ["fate"], 1, out, dags=[example], jobs=1,
                        console=Console(file=io.StringIO()))
    return out, results


def test_results_json_holds_the_contract_keys(bench):
    out, results = bench
    data = json.loads((out / "results.json").read_text())
    assert TOP_KEYS <= set(data)
    assert (data["suite"], data["seeds"], data["instances"]) == ("smoke", [0], ["examples-mixed", "examples-batch"])
    assert list(data["policies"]) == [RR, "fate"]  # round_robin is always run, first, as the normaliser
    for policy, figures in data["policies"].items():
        assert POLICY_KEYS <= set(figures), policy
    assert [(r["instance"], r["seed"], r["policy"]) for r in data["per_instance"]] == [
        ("examples-batch", 0, RR), ("examples-batch", 0, "fate"),
        ("examples-mixed", 0, RR), ("examples-mixed", 0, "fate")]
    for row in data["per_instance"]:
        assert ROW_KEYS <= set(row)
    assert data["per_instance"] == results["per_instance"]


def test_round_robin_normalises_to_exactly_one_and_fate_to_its_geometric_mean(bench):
    out, _ = bench
    data = json.loads((out / "results.json").read_text())
    rr = data["policies"][RR]
    assert rr["normalized_makespan"] == 1.0 and rr["normalized_p95"] == 1.0
    rows = {(r["instance"], r["policy"]): r for r in data["per_instance"]}
    ratios = [rows[(i, "fate")]["makespan_s"] / rows[(i, RR)]["makespan_s"] for i in data["instances"]]
    assert data["policies"]["fate"]["normalized_makespan"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
    lb = [rows[(i, RR)]["makespan_s"] / rows[(i, RR)]["lb_s"] for i in data["instances"]]
    assert rr["lb_ratio"] == pytest.approx(math.sqrt(lb[0] * lb[1]))


def test_results_csv_has_one_row_per_run_with_the_contract_columns(bench):
    out, results = bench
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert ROW_KEYS <= set(header)
    assert header == list(results["per_instance"][0])  # the same columns, in the record's order
    assert len(rows) == len(results["per_instance"]) == 4
    for got, want in zip(rows, results["per_instance"], strict=True):
        assert (got["instance"], int(got["seed"]), got["policy"]) == (want["instance"], want["seed"], want["policy"])
        for key in ("makespan_s", "p95_s", "lb_s"):
            assert float(got[key]) == want[key]  # written in full precision
    assert (out / "results.md").is_file() and (out / "summary.png").stat().st_size > 0
