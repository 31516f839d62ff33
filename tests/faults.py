"""Faults the Ray tests inject (shared by the SimEngine and vLLM worker tests)."""

from __future__ import annotations

import time

import ray


def kill_a_busy_worker(planner, workers: dict, timeout_s: float = 120.0) -> str:
    """Kill the worker of the device that has run a shard longest, as soon as one runs; returns its device id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = ray.get(planner.running_devices.remote())
        if running:
            ray.kill(workers[running[0]])
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"no shard ran within {timeout_s:.0f} s")
