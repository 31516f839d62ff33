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

COLUMNS = (
    ("normalized_makespan", "norm. makespan", "{:.3f}"),
    ("normalized_p95", "norm. P95", "{:.3f}"),
    ("makespan_s", "makespan s", "{:.1f}"),
    ("p95_s", "P95 s", "{:.1f}"),
    ("lb_ratio", "makespan/LB", "{:.2f}"),
    ("prefix_hit_rate", "prefix hit", "{:.2f}"),
    ("model_loads", "loads/run", "{:.1f}"),
    ("model_wakes", "wakes/run", "{:.1f}"),
    ("plan_ms_p95", "plan ms p95", "{:.2f}"),
    ("failed_workflows", "failed", "{:d}"),
)


def table(title: str, summary: dict) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("policy")
    for _, label, _ in COLUMNS:
        t.add_column(label, justify="right")
    ranked = sorted(summary.items(), key=lambda kv: _sort_key(kv[1]["normalized_makespan"]))
    for policy, m in ranked:
        t.add_row(policy, *(_fmt(fmt, m[key]) for key, _, fmt in COLUMNS))
    return t


def _sort_key(x: float) -> float:
    return math.inf if x != x else x


def _fmt(fmt: str, value) -> str:
    if isinstance(value, float) and value != value:
        return "-"
    return fmt.format(value)


def print_report(console: Console, results: dict) -> None:
    console.print(table(f"suite {results['suite']}: {len(results['instances'])} instances x "
                        f"{len(results['seeds'])} seeds (normalised to round_robin, geometric mean)",
                        results["policies"]))
    for group, summary in results.get("by_group", {}).items():
        console.print(table(f"{results['suite']} / {group}", summary))


def markdown(results: dict) -> str:
    """The report's tables as Markdown (results.md), for BENCHMARKS.md and issue notes."""
    lines = []
    sections = [("all instances", results["policies"])] + list(results.get("by_group", {}).items())
    for title, summary in sections:
        lines += [f"**{results['suite']}: {title}**", "",
                  "| policy | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for policy, m in sorted(summary.items(), key=lambda kv: _sort_key(kv[1]["normalized_makespan"])):
            lines.append(f"| {policy} | " + " | ".join(_fmt(fmt, m[key]) for key, _, fmt in COLUMNS) + " |")
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
    ax.bar([i - width / 2 for i in x], [summary[p]["normalized_makespan"] for p in policies], width,
           label="makespan")
    ax.bar([i + width / 2 for i in x], [summary[p]["normalized_p95"] for p in policies], width, label="P95 latency")
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
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
