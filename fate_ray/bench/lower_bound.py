"""A best-case bound on an instance's makespan, to report how far a schedule is from the limit.

    LB = max(work bound, path bound) - first arrival
    work bound = first arrival + sum over workflows of best-case work / number of devices
    path bound = max over workflows of (arrival + best-case critical path)

Best case = every stage as one batch on its fastest device type, model resident, no queue, expected output
lengths (cost.py, stateless). It is an estimate, not a proof: prefix-cache hits can make prefill cheaper than
"best case", and the run's noise and output lengths differ from the expectation.
"""

from __future__ import annotations

from typing import Sequence

from fate_ray.controller import expected_prompt_tokens
from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.sim.arrivals import best_case_work_s
from fate_ray.workload import Workflow


def critical_path_s(workflow: Workflow, estimator: CostEstimator) -> float:
    prompts = expected_prompt_tokens(workflow)
    finish: dict[str, float] = {}
    for sid in workflow.order:
        st = workflow.stages[sid]
        # Fully sharded, a stage lasts as long as its longest single request.
        longest = max(estimator.best_service_s(st.model, [RequestShape(prompts[sid][i], (), st.expected_output_tokens)])
                      for i in range(st.num_requests))
        finish[sid] = longest + max((finish[p] for p in st.parents), default=0.0)
    return max(finish.values(), default=0.0)


def lower_bound_s(workflows: Sequence[Workflow], estimator: CostEstimator) -> float:
    first = min(w.arrival_s for w in workflows)
    work = first + sum(best_case_work_s(w, estimator) for w in workflows) / len(estimator.cluster.devices)
    path = max(w.arrival_s + critical_path_s(w, estimator) for w in workflows)
    return max(work, path) - first
