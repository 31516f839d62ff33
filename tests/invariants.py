"""Invariants every simulated run must satisfy, whatever the policy (shared by the simulator and FATE tests)."""

from __future__ import annotations

from collections import Counter, defaultdict

from fate_ray.sim.simulator import SimResult

EPS = 1e-6


def check_run(cluster, instances, result: SimResult) -> list[dict]:
    """Every invariant a user relies on; returns the trace rows for further checks."""
    result.controller.validate_state()
    assert not result.failed
    assert set(result.completions_s) == {w.workflow_id for w in instances}
    rows = result.trace_rows()

    # Every stage ran, and each of its requests has exactly one recorded output, the one the trace executed.
    tokens_by_stage: Counter = Counter()
    for row in rows:
        tokens_by_stage[(row["workflow"], row["stage"])] += row["output_tokens"]
    for w in instances:
        for sid, stage in w.stages.items():
            outputs = result.controller.workflows[w.workflow_id].stages[sid].output_tokens
            assert sorted(outputs) == list(range(stage.num_requests)), (w.workflow_id, sid)
            assert tokens_by_stage[(w.workflow_id, sid)] == sum(outputs.values()), (w.workflow_id, sid)

    # Dependencies: a shard starts once every shard of its parent stages has ended.
    last_end = defaultdict(float)
    for row in rows:
        key = (row["workflow"], row["stage"])
        last_end[key] = max(last_end[key], row["end_s"])
    for row in rows:
        assert row["start_s"] >= row["arrival_s"] - EPS
        for parent in row["parents"]:
            assert row["start_s"] >= last_end[(row["workflow"], parent)] - EPS, (row["shard"], parent)

    # Concurrency and memory: sweep each device's shard starts and ends (an end frees its slot before a start at
    # the same instant takes it).
    types = {d.device_id: cluster.device_types[d.type] for d in cluster.devices}
    by_device = defaultdict(list)
    for row in rows:
        by_device[row["device"]] += [(row["start_s"], 1, row["model"]), (row["end_s"], -1, row["model"])]
    for device_id, events in by_device.items():
        running: Counter = Counter()
        for _, delta, model in sorted(events, key=lambda e: (e[0], e[1])):
            running[model] += delta
            if not running[model]:
                del running[model]
            assert sum(running.values()) <= types[device_id].concurrency, device_id
            held_gib = sum(cluster.models[m].footprint_gib for m in running)
            assert held_gib <= types[device_id].memory_gib + EPS, (device_id, dict(running))
    return rows
