"""Arrival processes: when each workflow instance is submitted.

- `all_at_once`: every workflow at t = 0 (a batch; makespan is the figure of merit).
- `poisson`: exponential inter-arrival times with the rate that loads the cluster to a target utilisation:
  rate = utilisation x devices / mean best-case work per workflow (device-seconds, stateless estimates), so a
  utilisation of 0.7 means the cluster would be 70% busy if every stage ran at its best-case speed.
- `trace`: keep each workflow's own arrival time (e.g. Mooncake timestamps).
Instances are renamed `<workflow id>#<k>` so repeated submissions of one DAG stay distinct.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.workload import Workflow, expected_prompt_tokens, stable_key

ArrivalMode = Literal["all_at_once", "poisson", "trace"]


def best_case_work_s(workflow: Workflow, estimator: CostEstimator) -> float:
    """Device-seconds of a workflow at best: each stage one stateless shard on its fastest device type."""
    prompts = expected_prompt_tokens(workflow)
    total = 0.0
    for sid, st in workflow.stages.items():
        reqs = [RequestShape(prompts[sid][i], (), st.expected_output_tokens) for i in range(st.num_requests)]
        total += estimator.best_service_s(st.model, reqs)
    return total


def arrivals(workflows: Sequence[Workflow], mode: ArrivalMode, estimator: CostEstimator, seed: int,
             utilisation: float = 0.7) -> list[Workflow]:
    """Return the workflows as instances with arrival times, in arrival order."""
    if mode == "trace":
        return sorted(workflows, key=lambda w: w.arrival_s)
    if mode == "all_at_once":
        return [w.with_arrival(f"{w.workflow_id}#{k}", 0.0) for k, w in enumerate(workflows)]
    if mode != "poisson":
        raise ValueError(f"unknown arrival mode {mode!r}; known: all_at_once, poisson, trace")
    if not 0 < utilisation:
        raise ValueError("utilisation must be positive")
    mean_work_s = sum(best_case_work_s(w, estimator) for w in workflows) / max(1, len(workflows))
    rate_per_s = utilisation * len(estimator.cluster.devices) / mean_work_s
    rng = random.Random(stable_key("arrivals", seed))
    now_s, out = 0.0, []
    for k, w in enumerate(workflows):
        out.append(w.with_arrival(f"{w.workflow_id}#{k}", now_s))
        now_s += rng.expovariate(rate_per_s)
    return out
