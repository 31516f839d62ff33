"""A best-case bound on an instance's makespan, to report how far a schedule is from the limit.

    LB = max(work bound, path bound) - first arrival
    work bound = first arrival + (sum over workflows of best-case work + one cold load per model used)
                 / number of devices
    path bound = max over workflows of (arrival + best-case critical path)

Every device starts empty, so a stage cannot start before its model's fastest cold load has finished (counted
from time 0 on the critical path) and every model used is loaded at least once (counted in the work).
Best case = every stage as one batch on its fastest device type, model resident, no queue, expected output
lengths (cost.py, stateless). It is an estimate, not a proof: prefix-cache hits can make prefill cheaper than
"best case", and the run's noise and output lengths differ from the expectation.
"""

from __future__ import annotations

from collections.abc import Sequence

from fate_ray.cost import CostEstimator, RequestShape
from fate_ray.sim.arrivals import best_case_work_s
from fate_ray.workload import Workflow, expected_prompt_tokens


def min_load_s(model: str, estimator: CostEstimator) -> float:
    cluster = estimator.cluster
    return min(cluster.models[model].profiles[d.type].load_s for d in cluster.devices_for(model))


def critical_path_end_s(workflow: Workflow, estimator: CostEstimator) -> float:
    """Earliest possible completion time of `workflow`, from its arrival and the cluster's empty start at t=0."""
    prompts = expected_prompt_tokens(workflow)
    finish: dict[str, float] = {}
    for sid in workflow.order:
        st = workflow.stages[sid]
        # Fully sharded, a stage lasts as long as its longest single request.
        longest = max(estimator.best_service_s(st.model, [RequestShape(prompts[sid][i], (), st.expected_output_tokens)])
                      for i in range(st.num_requests))
        ready = max([workflow.arrival_s, min_load_s(st.model, estimator)] + [finish[p] for p in st.parents])
        finish[sid] = ready + longest
    return max(finish.values(), default=workflow.arrival_s)


def lower_bound_s(workflows: Sequence[Workflow], estimator: CostEstimator) -> float:
    first = min(w.arrival_s for w in workflows)
    models = {st.model for w in workflows for st in w.stages.values()}
    work_s = sum(best_case_work_s(w, estimator) for w in workflows) + sum(min_load_s(m, estimator) for m in models)
    work = first + work_s / len(estimator.cluster.devices)
    path = max(critical_path_end_s(w, estimator) for w in workflows)
    return max(work, path) - first
