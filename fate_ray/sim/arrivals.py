"""Arrival processes: when each workflow instance is submitted.

- `all_at_once`: every workflow at t = 0 (a batch; makespan is the figure of merit).
- `poisson`: exponential inter-arrival times with the rate that loads the cluster to a target utilisation U,
  counting the model loads the stream implies as well as its work:

      rate = U x devices x N / (W + L)        (workflows per second; N workflows in the stream)
      W = sum over the N workflows of their best-case work (device-seconds: each stage as one stateless shard
          on its fastest device type, model resident, empty cache; `best_case_work_s`)
      L = sum over the models m the stream uses of k_m x (m's fastest cold load, s)
      k_m = ceil(U x devices x W_m / W), at least 1 and at most the devices that fit m; W_m = m's part of W

  k_m is the number of devices m's work keeps busy on average at utilisation U, rounded up: the replicas any
  schedule must load to serve the stream at that rate. So the stream's busy time, work plus these loads, is U of
  the cluster's time over the stream's expected span (N / rate). The rule depends on the workflows and the cluster
  only, never on the policy or on the regime (cold and warm runs of an instance get the same arrivals). It counts
  each replica's load once: reloads forced by memory pressure and switches between models are a policy's own cost
  and are not offered load, so the estimate is the lower end of what a schedule pays.
- `trace`: keep each workflow's own arrival time (e.g. Mooncake timestamps).
Instances are renamed `<workflow id>#<k>` so repeated submissions of one DAG stay distinct.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.workload import Workflow, expected_prompt_tokens, stable_key

ArrivalMode = Literal["all_at_once", "poisson", "trace"]


def best_case_work_by_model(workflow: Workflow, estimator: CostEstimator) -> dict[str, float]:
    """Best-case device-seconds of a workflow per model (see `best_case_work_s`)."""
    prompts = expected_prompt_tokens(workflow)
    out: dict[str, float] = {}
    for sid, st in workflow.stages.items():
        reqs = [RequestShape(prompts[sid][i], (), st.expected_output_tokens) for i in range(st.num_requests)]
        out[st.model] = out.get(st.model, 0.0) + estimator.best_service_s(st.model, reqs)
    return out


def best_case_work_s(workflow: Workflow, estimator: CostEstimator) -> float:
    """Device-seconds of a workflow at best: each stage one stateless shard on its fastest device type."""
    return sum(best_case_work_by_model(workflow, estimator).values())


def expected_load_s(work_by_model: dict[str, float], estimator: CostEstimator, utilisation: float) -> float:
    """L of the module docstring: device-seconds of the cold loads a stream with this work per model implies."""
    cluster = estimator.cluster
    total = sum(work_by_model.values())
    devices = len(cluster.devices)
    load_s = 0.0
    for model, work in sorted(work_by_model.items()):
        fitting = cluster.devices_for(model)
        if not fitting or total <= 0:
            continue
        replicas = min(len(fitting), max(1, math.ceil(utilisation * devices * work / total - 1e-9)))
        load_s += replicas * min(cluster.models[model].profiles[d.type].load_s for d in fitting)
    return load_s


def poisson_rate_per_s(workflows: Sequence[Workflow], estimator: CostEstimator, utilisation: float) -> float:
    """Workflows per second that load the cluster to `utilisation`, work plus implied loads (module docstring)."""
    work: dict[str, float] = {}
    memo: dict[int, dict[str, float]] = {}  # a stream often submits one Workflow object many times
    for w in workflows:
        if id(w) not in memo:
            memo[id(w)] = best_case_work_by_model(w, estimator)
        for model, s in memo[id(w)].items():
            work[model] = work.get(model, 0.0) + s
    busy_s = sum(work.values()) + expected_load_s(work, estimator, utilisation)
    if busy_s <= 0:
        raise ValueError("the workflows have no work to schedule")
    return utilisation * len(estimator.cluster.devices) * len(workflows) / busy_s


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
    if not workflows:
        return []
    rate_per_s = poisson_rate_per_s(workflows, estimator, utilisation)
    rng = random.Random(stable_key("arrivals", seed))
    now_s, out = 0.0, []
    for k, w in enumerate(workflows):
        out.append(w.with_arrival(f"{w.workflow_id}#{k}", now_s))
        now_s += rng.expovariate(rate_per_s)
    return out
