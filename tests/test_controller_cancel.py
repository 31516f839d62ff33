"""A cancelled workflow (its job stopped) on the pure Controller: its queued work goes, its running shards end
unrecorded, and the other workflows on the same devices are untouched."""

from __future__ import annotations

from fate_ray.bench.drive import finish_everything
from fate_ray.controller import Controller
from fate_ray.cost import CostEstimator
from fate_ray.events import Dispatch, WorkflowCancelled, WorkflowDone, WorkflowSubmitted
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.workload import Stage, TextPart, Workflow


def _workflow(wid: str, n: int, key: int) -> Workflow:
    s = Stage("s", "a", (), n, tuple((TextPart(key + i, 40),) for i in range(n)), expected_output_tokens=10,
              max_tokens=20)
    t = Stage("t", "a", ("s",), 1, ((TextPart(key + 100, 40),),), expected_output_tokens=10, max_tokens=20)
    return Workflow(wid, "test", 0.0, {"s": s, "t": t}, ("s", "t"))


def test_cancelling_one_job_drops_its_queued_work_and_the_other_workflow_completes(tiny_cluster):
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, make_policy("round_robin", PolicyContext(tiny_cluster, estimator)), estimator)
    mine = [c for c in ctl.handle(WorkflowSubmitted(_workflow("job1/w", 6, 1), 0.0)) if isinstance(c, Dispatch)]
    other = [c for c in ctl.handle(WorkflowSubmitted(_workflow("job2/w", 2, 50), 0.0)) if isinstance(c, Dispatch)]
    assert sum(d.queued_shards for d in ctl.status().devices) > 0  # job1's requests wait in queues

    out = ctl.handle(WorkflowCancelled("job1/w", 1.0))
    assert [c for c in out if isinstance(c, WorkflowDone)] == [
        WorkflowDone("job1/w", 1.0, ok=False, error="cancelled: its job stopped", arrival_s=0.0)]
    assert not any(isinstance(c, Dispatch) and c.shard.workflow_id == "job1/w" for c in out)
    assert ctl.handle(WorkflowCancelled("job1/w", 1.5)) == []  # a second cancel changes nothing

    # job1's running shards end unrecorded; job2 runs to completion on the freed devices.
    done, dispatched = finish_everything(ctl, mine + other + [c for c in out if isinstance(c, Dispatch)], 2.0)
    assert {d.shard.workflow_id for d in dispatched} == {"job2/w"}
    assert done == [WorkflowDone("job2/w", done[0].now_s, ok=True, arrival_s=0.0)]
    assert ctl.status().workflows["job1/w"].stages_done == 0
    ctl.validate_state()
