"""A Gantt chart of a run (device x wall time, one bar per shard, coloured by model): a schedule is easier to
look at than to read."""

from __future__ import annotations

from pathlib import Path


def plot_gantt(shards: list[dict], path: Path, title: str = "fate-ray run") -> None:
    """`shards`: dicts with device_id, model, started_s, ended_s, stage_id, workflow_id (the runtime's records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in shards if s.get("ended_s")]
    if not done:
        return
    t0 = min(s["started_s"] for s in done)
    devices = sorted({s["device_id"] for s in done})
    models = sorted({s["model"] for s in done})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(devices) + 1.6))
    for s in done:
        y = devices.index(s["device_id"])
        ax.barh(y, max(s["ended_s"] - s["started_s"], 1e-3), left=s["started_s"] - t0, height=0.6,
                color=colours[s["model"]], edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(devices)), devices)
    ax.invert_yaxis()
    ax.set_xlabel("wall time since the first shard started, s")
    ax.set_title(title)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in models], labels=models,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
