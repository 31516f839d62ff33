"""`fate-ray bench` aggregation, statistics and output files.

`aggregate` is fed hand-built per-run records (`JobResult`s) whose ratios to round_robin are chosen by hand; the
files are those of one real smoke-suite run (the self-consistency example, fate and round_robin, one seed, two
workflows per instance, cold and warm) on the shipped mixed cluster, checked against the results.json /
results.csv contract.
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
from fate_ray.bench.planner_scale import run_planner_scale
from fate_ray.bench.report import markdown
from fate_ray.bench.runner import NORMALISER, JobResult, aggregate
from fate_ray.bench.stats import BOOTSTRAP_RESAMPLES, best_baseline, bootstrap_ci, geomean, win_rate
from fate_ray.schema.cluster import default_cluster_path, load_cluster
from fate_ray.sim.simulator import percentile

ROOT = Path(__file__).resolve().parents[1]

TOP_KEYS = {"suite", "seeds", "instances", "policies", "per_instance", "best_baseline", "by_group", "by_regime"}
POLICY_KEYS = {"normalized_makespan", "normalized_p95", "makespan_s", "p95_s", "lb_ratio", "p95_lb_ratio",
               "prefix_hit_rate", "model_loads", "plan_ms_p95", "normalized_makespan_ci95", "normalized_p95_ci95",
               "vs_best_baseline_makespan", "vs_best_baseline_makespan_ci95", "vs_best_baseline_p95",
               "vs_best_baseline_p95_ci95", "win_rate_makespan", "win_rate_p95"}
ROW_KEYS = {"instance", "group", "regime", "seed", "policy", "makespan_s", "p95_s", "lb_s", "p95_lb_s"}
RR = NORMALISER


def run(instance: str, seed: int, policy: str, makespan_s: float, p95_s: float, *, lb_s: float = 10.0,
        p95_lb_s: float = 1.0, group: str = "", regime: str = "", workflows: int = 2, completed: int = 2, loads: int = 0,
        plan_ms: tuple = (), prompt_tokens: int = 0, cached_tokens: int = 0) -> JobResult:
    """One (instance, seed, policy) run's record, as `run_job` builds it."""
    row = {"instance": instance, "group": group, "regime": regime, "seed": seed, "policy": policy,
           "workflows": workflows,
           "completed": completed, "failed": workflows - completed, "makespan_s": makespan_s, "p95_s": p95_s,
           "lb_s": lb_s, "p95_lb_s": p95_lb_s, "prefix_hit_rate": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
           "model_loads": loads, "model_wakes": 0, "events": 10, "sim_wall_s": 0.01, "sim_controller_s": 0.005, "sim_plan_s": 0.001,
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
# statistics: bootstrap intervals, the best baseline, ratios to it and win rates

RATIOS = [0.5, 0.8, 1.0, 1.25, 2.0, 0.6]


def test_bootstrap_interval_holds_the_estimate_is_deterministic_and_shrinks_with_more_runs():
    point = geomean(RATIOS)
    low, high = bootstrap_ci(RATIOS)
    assert min(RATIOS) < low < point < high < max(RATIOS)
    assert bootstrap_ci(RATIOS) == [low, high]  # seeded: the same runs give the same interval
    more = RATIOS * 10  # the same spread over ten times the runs
    assert geomean(more) == pytest.approx(point)
    low10, high10 = bootstrap_ci(more)
    assert low10 < point < high10
    assert high10 - low10 < (high - low) / 2  # ~1/sqrt(10) as wide
    assert bootstrap_ci([0.7] * 5) == [0.7, 0.7] and bootstrap_ci([0.7]) == [0.7, 0.7]
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert BOOTSTRAP_RESAMPLES == 2000


def test_aggregate_reports_the_normalised_intervals():
    runs = [r for k, ratio in enumerate(RATIOS)
            for r in (run(f"i{k}", 0, RR, 100, 50), run(f"i{k}", 0, "x", 100 * ratio, 50 * ratio))]
    x = aggregate(runs, [RR, "x"])["policies"]["x"]
    assert x["normalized_makespan"] == pytest.approx(geomean(RATIOS))
    assert x["normalized_makespan_ci95"] == pytest.approx(bootstrap_ci(RATIOS))
    assert x["normalized_p95_ci95"] == pytest.approx(bootstrap_ci(RATIOS))
    assert aggregate(runs, [RR, "x"])["policies"][RR]["normalized_makespan_ci95"] == [1.0, 1.0]


def test_win_rate_counts_ties_half():
    assert win_rate([(1, 2), (2, 2), (3, 2)]) == 0.5
    assert win_rate([(1, 2), (1, 2), (3, 2), (2, 2)]) == 0.625
    assert math.isnan(win_rate([]))


# Three (instance, seed) runs. Against round_robin (100 / 100 each): heft makespan 0.5, 0.6, 0.7 and P95 0.5 ->
# sqrt(0.594 x 0.5) = 0.545; model_affinity 0.6 and 0.4 -> sqrt(0.24) = 0.490, the best baseline. fate scores
# better still (makespan 0.3, 0.6, 1.2 -> 0.6; P95 0.2, 0.2, 0.8 -> 0.317) but is no baseline.
VERSUS = [
    run("i1", 0, RR, 100, 100), run("i1", 0, "heft", 50, 50), run("i1", 0, "model_affinity", 60, 40),
    run("i1", 0, "fate", 30, 20),
    run("i2", 0, RR, 100, 100), run("i2", 0, "heft", 60, 50), run("i2", 0, "model_affinity", 60, 40),
    run("i2", 0, "fate", 60, 20),
    run("i1", 1, RR, 100, 100), run("i1", 1, "heft", 70, 50), run("i1", 1, "model_affinity", 60, 40),
    run("i1", 1, "fate", 120, 80),
]
POLICIES = [RR, "heft", "model_affinity", "fate"]


def test_best_baseline_is_the_lowest_combined_score_among_the_baselines_run():
    result = aggregate(VERSUS, POLICIES, baselines=(RR, "random", "heft", "model_affinity"))
    assert result["best_baseline"] == "model_affinity"
    summary = result["policies"]
    assert math.sqrt(summary["heft"]["normalized_makespan"] * summary["heft"]["normalized_p95"]) == \
        pytest.approx(math.sqrt((0.5 * 0.6 * 0.7) ** (1 / 3) * 0.5))
    # fate is better but no baseline; a baseline that was not run cannot be chosen; ties go to the earlier name
    figures = {p: {"normalized_makespan": m, "normalized_p95": q} for p, m, q in
               [(RR, 1.0, 1.0), ("heft", 0.5, 0.8), ("model_affinity", 0.8, 0.5), ("fate", 0.1, 0.1),
                ("random", float("nan"), 1.0)]}
    assert best_baseline(figures, ["random", RR, "heft", "model_affinity"]) == "heft"
    assert best_baseline(figures, ["random", RR, "model_affinity", "heft"]) == "model_affinity"
    assert best_baseline(figures, ["least_loaded", RR]) == RR
    assert best_baseline(figures, ["random"]) is None
    assert aggregate(VERSUS, [RR, "fate"], baselines=(RR, "heft"))["best_baseline"] == RR


def test_ratio_to_the_best_baseline_and_win_rate_by_hand():
    """fate / model_affinity per run: makespan 0.5, 1.0, 2.0 -> 1.0, wins 1 + half a tie of 3 = 0.5; P95 0.5, 0.5,
    2.0 -> 0.5 ** (1/3), wins 2 of 3. heft: makespan 5/6, 1, 7/6 -> (35/36) ** (1/3), win rate 0.5; P95 1.25 each,
    never a win. The best baseline against itself: 1.0, [1.0, 1.0], ties only (0.5)."""
    summary = aggregate(VERSUS, POLICIES, baselines=(RR, "heft", "model_affinity"))["policies"]
    fate, heft, best = summary["fate"], summary["heft"], summary["model_affinity"]
    assert fate["vs_best_baseline_makespan"] == pytest.approx(1.0)
    assert fate["win_rate_makespan"] == pytest.approx(0.5)
    assert fate["vs_best_baseline_p95"] == pytest.approx(0.5 ** (1 / 3))
    assert fate["win_rate_p95"] == pytest.approx(2 / 3)
    assert fate["vs_best_baseline_p95_ci95"] == pytest.approx(bootstrap_ci([0.5, 0.5, 2.0]))
    assert heft["vs_best_baseline_makespan"] == pytest.approx((35 / 36) ** (1 / 3))
    assert (heft["win_rate_makespan"], heft["vs_best_baseline_p95"], heft["win_rate_p95"]) == \
        pytest.approx((0.5, 1.25, 0.0))
    assert (best["vs_best_baseline_makespan"], best["vs_best_baseline_makespan_ci95"], best["win_rate_makespan"]) \
        == (1.0, [1.0, 1.0], 0.5)


def test_groups_and_regimes_compare_with_the_suite_best_baseline():
    """Run i2 is warm, the others cold: by regime, fate / model_affinity makespan is 1.0 (warm) and sqrt(0.5 x 2)."""
    runs = [JobResult({**r.row, "regime": "warm" if r.row["instance"] == "i2" else "cold",
                       "group": "warm" if r.row["instance"] == "i2" else "cold"}, []) for r in VERSUS]
    result = aggregate(runs, POLICIES, baselines=(RR, "heft", "model_affinity"))
    assert list(result["by_regime"]) == list(result["by_group"]) == ["cold", "warm"]
    warm, cold = result["by_regime"]["warm"]["fate"], result["by_regime"]["cold"]["fate"]
    assert (warm["vs_best_baseline_makespan"], warm["win_rate_makespan"]) == (1.0, 0.5)
    assert cold["vs_best_baseline_makespan"] == pytest.approx(1.0) and cold["win_rate_makespan"] == 0.5
    assert cold["vs_best_baseline_p95"] == pytest.approx(1.0)  # 0.5 and 2.0
    text = markdown({"suite": "t", "seeds": [0, 1], "instances": ["i1", "i2"], **result})
    assert "best baseline model_affinity" in text and "**t: regime warm**" in text
    assert "**t: warm**" not in text  # a group that is just a regime is not repeated
    assert "| fate | 0.600 [" in text


# ---------------------------------------------------------------------------------------------------------------
# results.json / results.csv of a real run


@pytest.fixture(scope="module")
def bench(mixed_cluster, tmp_path_factory):
    """One smoke-suite run of the self-consistency example, two workflows per instance: 2 instances x 2 regimes x
    1 seed x (round_robin, fate), ~2 s."""
    out = tmp_path_factory.mktemp("bench")
    example = str(ROOT / "workflows" / "self_consistency.yaml")
    results = run_suite("smoke", mixed_cluster, ["fate"], 1, out, dags=[example], jobs=1,
                        console=Console(file=io.StringIO()), workflows_per_instance=2)
    return out, results


def test_results_json_holds_the_contract_keys(bench):
    out, results = bench
    data = json.loads((out / "results.json").read_text())
    assert TOP_KEYS <= set(data)
    assert (data["suite"], data["seeds"], data["instances"]) == (
        "smoke", [0], ["examples-mixed@cold", "examples-mixed@warm", "examples-batch@cold", "examples-batch@warm"])
    assert list(data["policies"]) == [RR, "fate"]  # round_robin is always run, first, as the normaliser
    for policy, figures in data["policies"].items():
        assert POLICY_KEYS <= set(figures), policy
    assert [(r["instance"], r["seed"], r["policy"]) for r in data["per_instance"]] == [
        (f"examples-{kind}@{regime}", 0, p) for kind in ("batch", "mixed") for regime in ("cold", "warm")
        for p in (RR, "fate")]
    for row in data["per_instance"]:
        assert ROW_KEYS <= set(row)
        assert row["workflows"] == row["completed"] == 2 and row["group"] == row["regime"]
    assert data["per_instance"] == results["per_instance"]
    assert list(data["by_regime"]) == list(data["by_group"]) == ["cold", "warm"]
    assert data["best_baseline"] == RR and data["workflows_per_instance"] == 2
    warm = [r for r in data["per_instance"] if r["regime"] == "warm"]
    cold = [r for r in data["per_instance"] if r["regime"] == "cold"]
    assert sum(r["model_loads"] for r in warm) < sum(r["model_loads"] for r in cold)


def test_round_robin_normalises_to_exactly_one_and_fate_to_its_geometric_mean(bench):
    out, _ = bench
    data = json.loads((out / "results.json").read_text())
    rr = data["policies"][RR]
    assert rr["normalized_makespan"] == 1.0 and rr["normalized_p95"] == 1.0
    rows = {(r["instance"], r["policy"]): r for r in data["per_instance"]}
    ratios = [rows[(i, "fate")]["makespan_s"] / rows[(i, RR)]["makespan_s"] for i in data["instances"]]
    fate = data["policies"]["fate"]
    assert fate["normalized_makespan"] == pytest.approx(math.prod(ratios) ** (1 / 4))
    low, high = fate["normalized_makespan_ci95"]
    assert low <= fate["normalized_makespan"] <= high
    lb = [rows[(i, RR)]["makespan_s"] / rows[(i, RR)]["lb_s"] for i in data["instances"]]
    assert rr["lb_ratio"] == pytest.approx(math.prod(lb) ** (1 / 4))
    p95_lb = [rows[(i, RR)]["p95_s"] / rows[(i, RR)]["p95_lb_s"] for i in data["instances"]]
    assert rr["p95_lb_ratio"] == pytest.approx(math.prod(p95_lb) ** (1 / 4)) and rr["p95_lb_ratio"] >= 1


def test_results_csv_has_one_row_per_run_with_the_contract_columns(bench):
    out, results = bench
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert ROW_KEYS <= set(header)
    assert header == list(results["per_instance"][0])  # the same columns, in the record's order
    assert len(rows) == len(results["per_instance"]) == 8
    for got, want in zip(rows, results["per_instance"], strict=True):
        assert (got["instance"], int(got["seed"]), got["policy"]) == (want["instance"], want["seed"], want["policy"])
        for key in ("makespan_s", "p95_s", "lb_s"):
            assert float(got[key]) == want[key]  # written in full precision
    assert (out / "summary.png").stat().st_size > 0
    text = (out / "results.md").read_text()
    assert "**smoke: regime cold**" in text and "**smoke: regime warm**" in text
    fate = results["policies"]["fate"]
    low, high = fate["normalized_makespan_ci95"]
    assert f"| fate | {fate['normalized_makespan']:.3f} [{low:.3f}, {high:.3f}] |" in text


def test_planner_scale_reports_every_size_and_its_p95_as_a_ratio_to_the_smallest(tmp_path):
    sizes = ((4, 8), (8, 16))
    results = run_planner_scale(load_cluster(default_cluster_path()), ["fate", "state_eft"], tmp_path, rounds=2,
                                console=Console(file=io.StringIO()), sizes=sizes)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert set(results["sizes"]) == {"4x8", "8x16"}
    for name in ("fate", "state_eft"):
        assert results["sizes"]["4x8"][name]["p95_over_4x8"] == 1.0
        bigger = results["sizes"]["8x16"][name]
        assert bigger["p95_over_4x8"] > 0 and bigger["rounds"] == 2 and sum(bigger["solver_status"].values()) == 2


def test_planner_scale_counts_the_rounds_cp_sat_ended_on_its_wall_clock_limit(tmp_path):
    # A 1 microsecond wall limit ends every solve before its deterministic budget: each such plan would differ on
    # a faster machine, and the benchmark says how many there were. Baselines never have any.
    results = run_planner_scale(load_cluster(default_cluster_path()), ["fate:time_limit_ms=0.001", "state_eft"],
                                tmp_path, rounds=2, console=Console(file=io.StringIO()), sizes=((6, 8),))
    assert results["sizes"]["6x8"]["fate:time_limit_ms=0.001"]["wall_limited_rounds"] == 2
    assert results["sizes"]["6x8"]["state_eft"]["wall_limited_rounds"] == 0
