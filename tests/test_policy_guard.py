"""A planning round that raises, overruns its budget or returns a broken plan does not stall a live run: the round is
planned by least_loaded instead, its status says why, and every workflow still completes (pure Controller, tiny
cluster). Without the guard (simulator, tests) a broken plan stays a loud PlanContractError."""

from __future__ import annotations

import time

import pytest

from fate_ray.bench.drive import finish_everything
from fate_ray.controller import Controller
from fate_ray.cost import CostEstimator
from fate_ray.events import Dispatch, WorkflowDone, WorkflowSubmitted
from fate_ray.policies import Assignment, Plan, Policy, PolicyContext
from fate_ray.policies.base import PlanContractError
from fate_ray.policies.guard import GuardedPolicy
from fate_ray.workload import Stage, TextPart, Workflow


class Raises(Policy):
    name = "raises"

    def plan(self, snapshot, frontier):
        raise ZeroDivisionError("a bug in the policy")


class Stalls(Policy):
    name = "stalls"

    def plan(self, snapshot, frontier):
        time.sleep(1.0)
        return Plan(())


class DropsARequest(Policy):
    name = "drops"

    def plan(self, snapshot, frontier):
        device = snapshot.devices[0].device.device_id
        return Plan(tuple(Assignment(s.key, device, s.request_indices[1:]) for s in frontier))


def chain(wid: str) -> Workflow:
    a = Stage("a", "a", (), 3, tuple((TextPart(i, 40),) for i in range(3)), expected_output_tokens=10, max_tokens=20)
    b = Stage("b", "b", ("a",), 1, ((TextPart(9, 40),),), expected_output_tokens=10, max_tokens=20)
    return Workflow(wid, "test", 0.0, {"a": a, "b": b}, ("a", "b"))


def run_to_completion(ctl: Controller, wf: Workflow) -> list[WorkflowDone]:
    return finish_everything(ctl, [c for c in ctl.handle(WorkflowSubmitted(wf, 0.0)) if isinstance(c, Dispatch)],
                             1.0)[0]


@pytest.mark.parametrize(("policy", "status", "budget_s"), [(Raises, "FALLBACK_ERROR", 30.0),
                                                            (Stalls, "FALLBACK_TIMEOUT", 0.2),
                                                            (DropsARequest, "FALLBACK_INVALID", 30.0)])
def test_a_broken_round_falls_back_and_the_workflow_completes(tiny_cluster, policy, status, budget_s):
    estimator = CostEstimator(tiny_cluster)
    guarded = GuardedPolicy(policy(PolicyContext(tiny_cluster, estimator)), budget_s=budget_s)
    ctl = Controller(tiny_cluster, guarded, estimator)
    done = run_to_completion(ctl, chain("w"))
    assert [(d.workflow_id, d.ok) for d in done] == [("w", True)]
    stats = ctl.status().stats
    assert stats.solver_status == {status: stats.planning_rounds} and stats.planning_rounds == 2
    ctl.validate_state()


def test_without_the_guard_a_broken_plan_is_a_contract_error(tiny_cluster):
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, DropsARequest(PolicyContext(tiny_cluster, estimator)), estimator)
    with pytest.raises(PlanContractError, match="left 1 request"):
        ctl.handle(WorkflowSubmitted(chain("w"), 0.0))
