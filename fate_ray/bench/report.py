"""Write a benchmark's results (results.json, results.csv, summary.png, trace.jsonl) and print its table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fate_ray.bench.runner import JobResult

# (key, label, format); "ci" shows the figure with its `<key>_ci95` interval, "pct" a share as a percentage.
COLUMNS = (
    ("normalized_makespan", "norm. makespan [95% CI]", "ci"),
    ("normalized_p95", "norm. P95 [95% CI]", "ci"),
    ("vs_best_baseline_makespan", "makespan / best baseline [95% CI]", "ci"),
    ("vs_best_baseline_p95", "P95 / best baseline [95% CI]", "ci"),
    ("win_rate_makespan", "wins makespan", "pct"),
    ("win_rate_p95", "wins P95", "pct"),
    ("makespan_s", "makespan s", "{:.1f}"),
    ("p95_s", "P95 s", "{:.1f}"),
    ("lb_ratio", "makespan/LB", "{:.2f}"),
    ("p95_lb_ratio", "P95/LB", "{:.2f}"),
    ("prefix_hit_rate", "prefix hit", "{:.2f}"),
    ("model_loads", "loads/run", "{:.1f}"),
    ("model_wakes", "wakes/run", "{:.1f}"),
    ("plan_ms_p95", "plan ms p95", "{:.2f}"),
    ("failed_workflows", "failed", "{:d}"),
)
# The console keeps to 160 columns: intervals on the normalised figures only, no raw seconds; "hit" = prefix hit
# rate, "loads" = model loads per run.
CONSOLE_COLUMNS = (
    ("normalized_makespan", "norm. makespan", "ci"),
    ("normalized_p95", "norm. P95", "ci"),
    ("vs_best_baseline_makespan", "mksp/best", "{:.3f}"),
    ("vs_best_baseline_p95", "P95/best", "{:.3f}"),
    ("win_rate_makespan", "win mksp", "pct"),
    ("win_rate_p95", "win P95", "pct"),
    ("lb_ratio", "mksp/LB", "{:.2f}"),
    ("p95_lb_ratio", "P95/LB", "{:.2f}"),
    ("prefix_hit_rate", "hit", "{:.2f}"),
    ("model_loads", "loads", "{:.1f}"),
    ("plan_ms_p95", "plan ms p95", "{:.2f}"),
    ("failed_workflows", "failed", "{:d}"),
)


def table(title: str, summary: dict) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("policy")
    for _, label, _ in CONSOLE_COLUMNS:
        t.add_column(label, justify="right")
    for policy, m in _ranked(summary):
        t.add_row(policy, *(_cell(m, key, fmt, digits=2) for key, _, fmt in CONSOLE_COLUMNS))
    return t


def _ranked(summary: dict) -> list[tuple[str, dict]]:
    return sorted(summary.items(), key=lambda kv: _sort_key(kv[1]["normalized_makespan"]))


def _sort_key(x: float) -> float:
    return math.inf if x != x else x


def _nan(value) -> bool:
    return isinstance(value, float) and value != value


def _cell(figures: dict, key: str, fmt: str, digits: int = 3) -> str:
    value = figures.get(key, float("nan"))
    if _nan(value):
        return "-"
    if fmt == "pct":
        return f"{value:.0%}"
    if fmt == "ci":
        low, high = figures.get(f"{key}_ci95", (float("nan"), float("nan")))
        if _nan(low) or _nan(high):
            return f"{value:.{digits}f}"
        return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return fmt.format(value)


def sections(results: dict) -> list[tuple[str, dict]]:
    """(title, policy -> figures): all instances, each regime, then each group that is not just a regime."""
    regimes = results.get("by_regime", {})
    out = [("all instances", results["policies"])]
    out += [(f"regime {name}", summary) for name, summary in regimes.items()]
    out += [(name, summary) for name, summary in results.get("by_group", {}).items() if name not in regimes]
    return out


def _heading(results: dict) -> str:
    best = results.get("best_baseline")
    return (f"suite {results['suite']}: {len(results['instances'])} instances x {len(results['seeds'])} seeds "
            f"(normalised to round_robin, geometric mean; best baseline {best or '-'})")


def print_report(console: Console, results: dict) -> None:
    for title, summary in sections(results):
        name = _heading(results) if title == "all instances" else f"{results['suite']} / {title}"
        console.print(table(name, summary))


def markdown(results: dict) -> str:
    """The report's tables as Markdown (results.md), for BENCHMARKS.md and issue notes."""
    lines = [_heading(results) + ". Intervals: 95% bootstrap over (instance, seed) runs; wins: share of runs "
             "below the best baseline, ties count half.", ""]
    for title, summary in sections(results):
        lines += [f"**{results['suite']}: {title}**", "",
                  "| policy | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for policy, m in _ranked(summary):
            lines.append(f"| {policy} | " + " | ".join(_cell(m, key, fmt) for key, _, fmt in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(out_dir: Path, results: dict, jobs: Sequence[JobResult], trace: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    rows = results["per_instance"]
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["instance"])
        writer.writeheader()
        writer.writerows(rows)
    if trace:
        with open(out_dir / "trace.jsonl", "w") as fh:
            for job in jobs:
                for row in job.trace:
                    fh.write(json.dumps(row) + "\n")
    plot_summary(out_dir / "summary.png", results)


def plot_summary(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["policies"]
    policies = sorted(summary, key=lambda p: _sort_key(summary[p]["normalized_makespan"]))
    groups = results.get("by_group") or {}
    fig, axes = plt.subplots(1, 2 if groups else 1, figsize=(13 if groups else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    x = range(len(policies))
    width = 0.4
    for offset, key, label in ((-width / 2, "normalized_makespan", "makespan"), (width / 2, "normalized_p95",
                                                                               "P95 latency")):
        values = [summary[p][key] for p in policies]
        spans = [summary[p].get(f"{key}_ci95", (v, v)) for p, v in zip(policies, values)]
        errors = [[max(0.0, v - lo) for v, (lo, _) in zip(values, spans)],
                  [max(0.0, hi - v) for v, (_, hi) in zip(values, spans)]]
        ax.bar([i + offset for i in x], values, width, yerr=errors, capsize=2, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), policies, rotation=30, ha="right")
    ax.set_ylabel("normalised to round_robin (lower is better)")
    ax.set_title(f"suite {results['suite']}")
    ax.legend()
    if groups:
        ax2 = axes[0][1]
        names = list(groups)
        for p in policies:
            ax2.plot(names, [groups[g][p]["normalized_p95"] for g in names], marker="o", label=p)
        ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax2.set_ylabel("normalised P95 latency")
        ax2.set_title("by group")
        ax2.tick_params(axis="x", labelrotation=30)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
