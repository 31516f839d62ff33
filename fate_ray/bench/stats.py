"""Statistics over a suite's runs: geometric means of per-run ratios, bootstrap intervals, win rates and the best
baseline (docs/benchmarking.md, "Statistics").

A run is one (instance, seed) pair of a policy. Every figure here is a function of per-run ratios, so it weighs
each run equally whatever its length:
- geometric mean of ratios, over positive ratios;
- 95% interval: percentile bootstrap of that geometric mean over runs, `BOOTSTRAP_RESAMPLES` resamples of the
  runs with replacement drawn from a fixed seed (the same data always gives the same interval), the 2.5th and
  97.5th percentiles (linear interpolation) of the resampled geometric means, as [low, high];
- win rate against a reference policy: the share of paired runs where the policy's value is strictly lower; a tie
  counts half (so the reference against itself scores 0.5);
- best baseline: of the baselines that were run, the lowest sqrt(normalised makespan x normalised P95), i.e. the
  geometric mean of the two summary figures; ties go to the earlier name in the baseline list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20_240_917
CONFIDENCE = 0.95


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def bootstrap_ci(ratios: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> list[float]:
    """95% percentile-bootstrap interval of the geometric mean of the positive `ratios`, as [low, high]."""
    logs = np.log(np.asarray([r for r in ratios if r > 0], dtype=float))
    if logs.size == 0:
        return [float("nan"), float("nan")]
    if logs.size == 1 or np.all(logs == logs[0]):
        return [float(math.exp(logs[0]))] * 2
    picks = np.random.default_rng(seed).integers(0, logs.size, size=(resamples, logs.size))
    means = logs[picks].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(math.exp(low)), float(math.exp(high))]


def win_rate(pairs: Sequence[tuple[float, float]]) -> float:
    """Share of (policy value, reference value) pairs where the policy is strictly lower; ties count half."""
    if not pairs:
        return float("nan")
    return sum(1.0 if a < b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def combined_score(figures: Mapping[str, float]) -> float:
    """sqrt(normalised makespan x normalised P95): the figure the best baseline is chosen by."""
    product = figures["normalized_makespan"] * figures["normalized_p95"]
    return math.sqrt(product) if product > 0 else float("nan")


def best_baseline(summary: Mapping[str, Mapping[str, float]], baselines: Sequence[str]) -> str | None:
    """The baseline (in `baselines`, run, with finite figures) with the lowest `combined_score`."""
    scored = [(combined_score(summary[b]), i, b) for i, b in enumerate(baselines) if b in summary]
    scored = [s for s in scored if s[0] == s[0]]
    return min(scored)[2] if scored else None


def ratios_to(rows: Sequence[dict], reference: Mapping[tuple, dict], key: str) -> list[float]:
    """Each run's `key` over the reference run's on the same (instance, seed), where that exists and is positive."""
    out = []
    for r in rows:
        ref = reference.get((r["instance"], r["seed"]))
        if ref is not None and ref[key] > 0:
            out.append(r[key] / ref[key])
    return out


def versus(rows: Sequence[dict], reference: Mapping[tuple, dict]) -> dict:
    """vs-reference figures of a policy's runs (`rows`) against `reference` runs keyed by (instance, seed)."""
    out: dict = {}
    for metric, key in (("makespan", "makespan_s"), ("p95", "p95_s")):
        pairs = [(r[key], reference[(r["instance"], r["seed"])][key]) for r in rows
                 if (r["instance"], r["seed"]) in reference]
        ratios = ratios_to(rows, reference, key)
        out[f"vs_best_baseline_{metric}"] = geomean(ratios)
        out[f"vs_best_baseline_{metric}_ci95"] = bootstrap_ci(ratios)
        out[f"win_rate_{metric}"] = win_rate(pairs)
    return out
