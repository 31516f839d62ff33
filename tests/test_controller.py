"""The pure Controller driven event by event on the tiny cluster of conftest, with exact commands asserted.

Devices in cluster order: n1/gpu0, n1/gpu1 (fast: 10 GiB, 2 slots), n2/gpu2, n2/gpu3 (slow: 5 GiB, 1 slot).
Models a/b/c hold 3/4/6 GiB. RoundRobin cycles over the devices that fit a model in that order; LeastLoaded sends a
request to gpu0 whenever every device is idle. Every request has a 40-token prompt and expects 10 output tokens.
"""

from __future__ import annotations

import pytest

from fate_ray.controller import DEFAULT_QUEUE_ORDER, QUEUE_ORDERS, Controller
from fate_ray.cost import CostEstimator
from fate_ray.events import (
    Dispatch,
    LoadModel,
    ShardFailed,
    ShardFinished,
    StageDone,
    WorkerLost,
    WorkerStateReported,
    WorkflowDone,
    WorkflowReleased,
    WorkflowSubmitted,
)
from fate_ray.policies import BASELINES, Assignment, Plan, Policy, PolicyContext, make_policy
from fate_ray.policies.base import PlanContractError
from fate_ray.state import block_hashes
from fate_ray.status import DeviceStatus, WorkflowStatus
from fate_ray.workload import Segment, Stage, TextPart, Workflow

GPU0, GPU1, GPU2, GPU3 = "n1/gpu0", "n1/gpu1", "n2/gpu2", "n2/gpu3"


def make_controller(cluster, policy: str = "round_robin", max_attempts: int = 3) -> Controller:
    estimator = CostEstimator(cluster)
    return Controller(cluster, make_policy(policy, PolicyContext(cluster, estimator)), estimator, max_attempts)


def stage(sid: str, model: str, n: int = 1, parents: tuple[str, ...] = (), key: int = 1) -> Stage:
    prompts = tuple((TextPart(key + i, 40),) for i in range(n))
    return Stage(sid, model, parents, n, prompts, expected_output_tokens=10, max_tokens=20)


def workflow(wid: str, *stages: Stage, arrival_s: float = 0.0) -> Workflow:
    return Workflow(wid, "test", arrival_s, {s.stage_id: s for s in stages}, tuple(s.stage_id for s in stages))


def submit(ctl: Controller, wf: Workflow, now_s: float | None = None) -> list:
    return ctl.handle(WorkflowSubmitted(wf, wf.arrival_s if now_s is None else now_s))


def dispatches(commands) -> list[Dispatch]:
    return [c for c in commands if isinstance(c, Dispatch)]


def finish(ctl: Controller, d: Dispatch, now_s: float, text: str = "", device_id: str | None = None) -> list:
    n = len(d.shard.request_indices)
    return ctl.handle(ShardFinished(d.shard.shard_id, device_id or d.device_id, now_s, (7,) * n,
                                    (text,) * n if text else ()))


def fail(ctl: Controller, d: Dispatch, now_s: float, reason: str, retryable: bool = True) -> list:
    return ctl.handle(ShardFailed(d.shard.shard_id, d.device_id, now_s, reason, retryable))


def where(ds: list[Dispatch]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(d.shard.workflow_id, d.device_id, d.shard.request_indices) for d in ds]


def test_a_non_retryable_failure_fails_only_its_workflow_and_drops_its_queued_shards(tiny_cluster):
    """w1's first failure is final: its queued shards leave the slow devices, its running shard is ignored when it
    ends, and w2 runs on to its second stage and completes."""
    ctl = make_controller(tiny_cluster)
    w2 = submit(ctl, workflow("w2", stage("y", "a", n=4), stage("z", "b", parents=("y",)), arrival_s=0.0))
    w1 = submit(ctl, workflow("w1", stage("x", "a", n=4, key=10), arrival_s=1.0))
    assert where(w1) == [("w1", GPU0, (0,)), ("w1", GPU1, (1,))]  # the slow devices queue x's requests 2 and 3
    assert [d.queued_shards for d in ctl.status().devices] == [0, 0, 1, 1]

    assert fail(ctl, w1[0], 2.0, "CUDA error: illegal memory access", retryable=False) == [
        WorkflowDone("w1", 2.0, ok=False, error="stage 'x' failed after 1 attempt(s): CUDA error: illegal memory "
                     "access", arrival_s=1.0)]
    status = ctl.status()
    assert status.workflows["w1"] == WorkflowStatus("w1", 0, 1, False, "stage 'x' failed after 1 attempt(s): "
                                                    "CUDA error: illegal memory access")
    assert [d.queued_shards for d in status.devices] == [0, 0, 0, 0]
    assert finish(ctl, w1[1], 3.0) == []  # still running when w1 failed: nothing recorded, nothing started

    assert finish(ctl, w2[0], 4.0) == finish(ctl, w2[1], 4.0) == finish(ctl, w2[2], 4.0) == []
    done_y = finish(ctl, w2[3], 5.0)
    assert done_y[0] == StageDone("w2", "y", "a", 0.0, 5.0) and where(dispatches(done_y)) == [("w2", GPU0, (0,))]
    assert finish(ctl, dispatches(done_y)[0], 6.0)[-1] == WorkflowDone("w2", 6.0, ok=True, arrival_s=0.0)
    assert ctl.status().stats.duplicate_finishes == 0
    ctl.validate_state()


def test_a_stage_whose_model_no_live_device_fits_fails_its_workflow(tiny_cluster):
    """Model c fits only the fast devices: with both lost, a workflow that needs c fails at once."""
    ctl = make_controller(tiny_cluster)
    ctl.handle(WorkerLost(GPU0, 0.0))
    ctl.handle(WorkerLost(GPU1, 0.0))
    assert submit(ctl, workflow("w", stage("s", "c"), arrival_s=1.0)) == [
        WorkflowDone("w", 1.0, ok=False, error="stage 's' needs model 'c' but no live device fits it", arrival_s=1.0)]
    ctl.validate_state()


def test_a_retryable_failure_is_retried_up_to_max_attempts_then_fails_the_workflow(tiny_cluster):
    """Each retry is a new shard of the same request with the next attempt number, on the next device."""
    ctl = make_controller(tiny_cluster, max_attempts=3)
    [first] = dispatches(submit(ctl, workflow("w", stage("s", "a"))))
    [second] = fail(ctl, first, 1.0, "engine timeout")
    # A failure reported by a device that does not run the shard changes nothing.
    assert ctl.handle(ShardFailed(second.shard.shard_id, GPU3, 1.5, "confused worker")) == []
    [third] = fail(ctl, second, 2.0, "engine timeout")
    assert [(d.shard.attempt, d.device_id, d.shard.request_indices) for d in (first, second, third)] == [
        (1, GPU0, (0,)), (2, GPU1, (0,)), (3, GPU2, (0,))]
    assert len({d.shard.shard_id for d in (first, second, third)}) == 3
    assert fail(ctl, third, 3.0, "engine timeout") == [
        WorkflowDone("w", 3.0, ok=False, error="stage 's' failed after 3 attempt(s): engine timeout")]
    assert ctl.status().stats.retries == 2
    ctl.validate_state()


def test_a_late_finish_from_a_lost_worker_is_a_duplicate_and_records_nothing(tiny_cluster):
    """gpu0 is presumed dead while running the shard: the request is re-dispatched, and the old shard's late finish
    is counted as a duplicate; only the re-dispatched shard's output is recorded, once."""
    ctl = make_controller(tiny_cluster)
    [old] = dispatches(submit(ctl, workflow("w", stage("s", "a"))))
    [new] = ctl.handle(WorkerLost(GPU0, 1.0))
    assert (new.device_id, new.shard.request_indices, new.shard.attempt) == (GPU1, (0,), 2)
    assert ctl.status().devices[0] == DeviceStatus(GPU0, False, 0, 2, 0, ())

    assert finish(ctl, old, 2.0, "stale") == []
    assert finish(ctl, new, 2.5, "wrong device", device_id=GPU0) == []  # the new shard runs on gpu1, not gpu0
    assert ctl.status().stats.duplicate_finishes == 2
    assert ctl.status(["w"]).outputs["w"]["s"].output_tokens == {}
    assert finish(ctl, new, 3.0, "fresh") == [StageDone("w", "s", "a", 0.0, 3.0), WorkflowDone("w", 3.0, ok=True)]
    outputs = ctl.status(["w"]).outputs["w"]["s"]
    assert (dict(outputs.outputs), dict(outputs.output_tokens)) == ({0: "fresh"}, {0: 7})
    assert finish(ctl, old, 4.0, "stale") == []
    assert ctl.status().stats.duplicate_finishes == 3
    assert dict(ctl.status(["w"]).outputs["w"]["s"].outputs) == {0: "fresh"}
    ctl.validate_state()


def test_a_worker_report_replaces_the_controllers_belief_of_the_device(tiny_cluster):
    """gpu0 ran model a, then reports a asleep and b active with a prompt's blocks cached: the next b shard there is
    resident with its prefill skipped, and the next a shard is a wake, not resident."""
    ctl = make_controller(tiny_cluster, "least_loaded")
    [run_a] = dispatches(submit(ctl, workflow("w1", stage("s", "a"))))
    assert (run_a.device_id, run_a.activation) == (GPU0, "load")
    finish(ctl, run_a, 11.0)
    assert ctl.status().devices[0].active_models == ("a",)

    cached = block_hashes((Segment(50, 40),), tiny_cluster.block_tokens)  # the prompt of w2 below: 10 blocks
    assert ctl.handle(WorkerStateReported(GPU0, 12.0, {"a": "SLEEPING", "b": "ACTIVE"}, {"b": cached})) == []
    snap = ctl.snapshot().device(GPU0)
    assert dict(snap.residency) == {"a": "SLEEPING", "b": "ACTIVE"}
    assert set(snap.caches) == {"b"} and snap.caches["b"].runs() == cached
    assert ctl.status().devices[0].active_models == ("b",)

    [run_b] = dispatches(submit(ctl, workflow("w2", stage("s", "b", key=50)), 13.0))
    assert (run_b.device_id, run_b.activation, run_b.evict) == (GPU0, "resident", ())
    assert run_b.estimated_s == pytest.approx(0.1)  # decode only: 10 steps of 10 ms; the 40 prompt tokens are cached
    finish(ctl, run_b, 14.0)
    [wake_a] = dispatches(submit(ctl, workflow("w3", stage("s", "a", key=60)), 15.0))
    assert (wake_a.device_id, wake_a.activation, wake_a.evict) == (GPU0, "wake", ())  # 4 + 3 GiB fit in 10
    ctl.validate_state()


def only_gpu2(make_cluster) -> Controller:
    """Slow devices with 2 slots, and every device but gpu2 lost: all shards queue on one 5 GiB device.

    On the tiny cluster as shipped no queue head can be blocked while a slot is free: a slow device has one slot,
    and a fast device's 10 GiB minus any one busy model leaves room for any other model.
    """
    ctl = make_controller(make_cluster(slow={"concurrency": 2}))
    for device_id in (GPU0, GPU1, GPU3):
        ctl.handle(WorkerLost(device_id, 0.0))
    return ctl


def test_a_shard_of_an_active_model_starts_ahead_of_a_head_that_has_no_memory(make_cluster):
    """gpu2 runs a (3 GiB, busy): the queued b (4 GiB) cannot fit beside it, so a later shard of a starts first;
    b starts, evicting a, once the last a shard ends."""
    ctl = only_gpu2(make_cluster)
    [a1] = submit(ctl, workflow("w1", stage("s", "a")), 1.0)
    assert (a1.device_id, a1.activation) == (GPU2, "load")
    assert submit(ctl, workflow("w2", stage("s", "b", key=20)), 2.0) == []  # b heads the queue, waiting for memory
    [a3] = submit(ctl, workflow("w3", stage("s", "a", key=30)), 3.0)
    assert (a3.shard.workflow_id, a3.activation) == ("w3", "resident")
    assert ctl.status().devices[2] == DeviceStatus(GPU2, True, 2, 2, 1, ("a",))

    assert dispatches(finish(ctl, a1, 4.0)) == []  # a is still busy with w3's shard: b still does not fit
    [b] = dispatches(finish(ctl, a3, 5.0))
    assert (b.shard.workflow_id, b.activation, b.evict) == ("w2", "load", ("a",))
    assert ctl.status().devices[2].active_models == ("b",)
    ctl.validate_state()


@pytest.mark.xfail(strict=True, reason="known gap in Controller._next_startable: shards of a resident model that "
                   "keep arriving while one of them runs are started ahead of the queue head forever")
def test_a_stream_of_resident_model_shards_does_not_starve_the_queue_head(make_cluster):
    """b waits at the head of gpu2's queue while shards of a keep arriving, each before the previous one ends."""
    ctl = only_gpu2(make_cluster)
    [running] = submit(ctl, workflow("w0", stage("s", "a")), 0.0)
    submit(ctl, workflow("head", stage("s", "b", key=20)), 0.5)
    started = []
    for k in range(1, 11):
        [nxt] = dispatches(submit(ctl, workflow(f"w{k}", stage("s", "a", key=100 + k)), float(k)))
        started += [d.shard.workflow_id for d in dispatches(finish(ctl, running, k + 0.5))]
        running = nxt
    assert "head" in started


def test_status_is_a_frozen_copy_with_stage_counts_devices_and_the_outputs_asked_for(tiny_cluster):
    """A status taken after w1's first stage keeps its figures while the Controller moves on.

    gpu1 also holds b: when w1 arrived, the generic prefetch (issue 8) loaded its second stage's model on the fastest
    idle device. RoundRobin does not look, and sends s2 to gpu2 anyway."""
    ctl = make_controller(tiny_cluster)
    [s1] = dispatches(submit(ctl, workflow("w1", stage("s1", "a"), stage("s2", "b", parents=("s1",)))))
    submit(ctl, workflow("w2", stage("s", "a", key=10)))
    [s2] = dispatches(finish(ctl, s1, 11.0, "hello"))
    before = ctl.status(outputs_of=["w1", "unknown"])

    def check(status) -> None:
        assert status.now_s == 11.0
        assert dict(status.workflows) == {"w1": WorkflowStatus("w1", 1, 2, False, ""),
                                          "w2": WorkflowStatus("w2", 0, 1, False, "")}
        assert status.devices == (DeviceStatus(GPU0, True, 0, 2, 0, ("a",)),
                                  DeviceStatus(GPU1, True, 1, 2, 0, ("a", "b")),
                                  DeviceStatus(GPU2, True, 1, 1, 0, ("b",)), DeviceStatus(GPU3, True, 0, 1, 0, ()))
        assert set(status.outputs) == {"w1"}
        assert dict(status.outputs["w1"]["s1"].outputs) == {0: "hello"}
        assert dict(status.outputs["w1"]["s1"].output_tokens) == {0: 7}
        assert dict(status.outputs["w1"]["s2"].output_tokens) == {}
        assert (status.stats.shards_dispatched, status.stats.planning_rounds, status.stats.duplicate_finishes) == (
            3, 3, 0)

    check(before)
    finish(ctl, s2, 12.0, "world")
    ctl.handle(WorkerLost(GPU1, 13.0))
    finish(ctl, s1, 14.0)  # a duplicate
    after = ctl.status(outputs_of=["w1"])
    assert after.workflows["w1"] == WorkflowStatus("w1", 2, 2, True, "")
    assert dict(after.outputs["w1"]["s2"].outputs) == {0: "world"} and after.stats.duplicate_finishes == 1
    check(before)
    with pytest.raises(TypeError):
        before.workflows["w3"] = WorkflowStatus("w3", 0, 1, False, "")  # type: ignore[index]
    ctl.validate_state()


def test_releasing_done_workflows_forgets_them_and_their_dag_once_unused(tiny_cluster):
    """Two instances of one DAG share its info: it goes when both are released; a release of a running workflow
    (or an unknown one) changes nothing."""
    ctl = make_controller(tiny_cluster)
    first = workflow("w1", stage("s", "a"))
    [d1] = dispatches(submit(ctl, first))
    [d2] = dispatches(submit(ctl, first.with_arrival("w2", 1.0)))
    assert len(ctl._dags) == 1
    assert ctl.handle(WorkflowReleased("w1", 2.0)) == [] and ctl.handle(WorkflowReleased("nope", 2.0)) == []
    assert set(ctl.status().workflows) == {"w1", "w2"}

    finish(ctl, d1, 11.0)
    ctl.handle(WorkflowReleased("w1", 12.0))
    assert set(ctl.status().workflows) == {"w2"} and len(ctl._dags) == 1  # w2 still uses the DAG
    finish(ctl, d2, 13.0)
    ctl.handle(WorkflowReleased("w2", 14.0))
    assert dict(ctl.status().workflows) == {} and ctl._dags == {} and ctl._dag_users == {}
    ctl.validate_state()


def test_a_shard_of_a_failed_and_released_workflow_that_ends_later_is_ignored(tiny_cluster):
    ctl = make_controller(tiny_cluster)
    d0, d1 = dispatches(submit(ctl, workflow("w", stage("s", "a", n=2))))
    fail(ctl, d0, 1.0, "out of memory", retryable=False)
    ctl.handle(WorkflowReleased("w", 2.0))
    assert dict(ctl.status().workflows) == {} and ctl._dags == {}
    assert finish(ctl, d1, 3.0, "late") == []
    assert ctl.status().devices[1].running_shards == 0 and ctl.status().stats.duplicate_finishes == 0
    ctl.validate_state()


def test_a_late_shard_of_a_released_run_does_not_feed_a_new_run_with_the_same_id(tiny_cluster):
    ctl = make_controller(tiny_cluster)
    wf = workflow("w", stage("s", "a", n=2))
    d0, d1 = dispatches(submit(ctl, wf))
    fail(ctl, d0, 1.0, "out of memory", retryable=False)
    ctl.handle(WorkflowReleased("w", 2.0))
    submit(ctl, wf, 3.0)  # the shell runs it again under its id (the old run was forgotten)
    assert finish(ctl, d1, 4.0, "stale") == []
    assert dict(ctl.status(["w"]).outputs["w"]["s"].outputs) == {}
    ctl.validate_state()


def test_stage_done_comes_once_per_stage_with_its_ready_time_and_workflow_done_carries_arrival(tiny_cluster):
    """p's two requests run as two shards: only the second finish completes p (ready at arrival, 2 s), and q is
    ready from that finish on (4 s)."""
    ctl = make_controller(tiny_cluster)
    p1, p2 = dispatches(submit(ctl, workflow("w", stage("p", "a", n=2), stage("q", "b", parents=("p",)),
                                             arrival_s=2.0)))
    commands = finish(ctl, p1, 3.0)
    assert commands == []
    commands = finish(ctl, p2, 4.0)
    assert commands[0] == StageDone("w", "p", "a", 2.0, 4.0)
    [q] = dispatches(commands)
    assert q.shard.ready_s == 4.0
    assert finish(ctl, q, 6.0) == [StageDone("w", "q", "b", 4.0, 6.0), WorkflowDone("w", 6.0, ok=True, arrival_s=2.0)]
    ctl.validate_state()


class _Unplaced(Policy):
    name = "test-unplaced"

    def plan(self, snapshot, frontier):
        return Plan(())


class _SlowForC(Policy):
    name = "test-slow-for-c"

    def plan(self, snapshot, frontier):
        return Plan(tuple(Assignment(f.key, GPU2, f.request_indices) for f in frontier))


@pytest.mark.parametrize("policy_class, message", [(_Unplaced, "left 1 request"), (_SlowForC, "not a live device")])
def test_a_policy_that_breaks_the_plan_contract_raises_plan_contract_error(tiny_cluster, policy_class, message):
    """Leaving a request unplaced, or placing model c on a 5 GiB device, is the policy's bug, not the user's."""
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, policy_class(PolicyContext(tiny_cluster, estimator)), estimator)
    with pytest.raises(PlanContractError, match=message) as caught:
        submit(ctl, workflow("w", stage("s", "c")))
    assert not isinstance(caught.value, ValueError)


def test_submitting_a_workflow_id_twice_is_refused_before_anything_changes(tiny_cluster):
    ctl = make_controller(tiny_cluster)
    wf = workflow("w", stage("s", "a"))
    submit(ctl, wf)
    with pytest.raises(ValueError, match="already submitted"):
        submit(ctl, wf, 1.0)
    assert ctl.status().stats.shards_dispatched == 1 and ctl._dag_users == {id(wf.stages): 1}
    ctl.validate_state()


# ---------------------------------------------------------------------------------------------------------------
# Controller disciplines every policy shares (issue 8): the queue order and the generic prefetch

ALL_POLICIES = (*BASELINES, "fate")


def parent_and_child(wid: str = "w") -> Workflow:
    """p (model a) then c (model b, absent everywhere at first)."""
    return workflow(wid, stage("p", "a"), stage("c", "b", parents=("p",), key=50))


def loads(commands) -> list[LoadModel]:
    return [c for c in commands if isinstance(c, LoadModel)]


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_every_policy_gets_the_generic_prefetch_of_its_next_stages_model(tiny_cluster, name):
    """Wherever the policy puts p, b is loaded ahead on the fastest idle device p does not use: gpu0, or gpu1 when
    p went to gpu0 (both fast; the lower index first)."""
    ctl = make_controller(tiny_cluster, name)
    commands = submit(ctl, parent_and_child())
    [p] = dispatches(commands)
    expected = GPU1 if p.device_id == GPU0 else GPU0
    assert loads(commands) == [LoadModel(expected, "b", (), "load", 0.0)]
    assert ctl.status().stats.prefetches == 1
    assert "b" in ctl.status().devices[int(expected[-1])].active_models
    ctl.validate_state()


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_no_policy_gets_a_prefetch_when_the_controller_flag_is_off(tiny_cluster, name):
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, make_policy(name, PolicyContext(tiny_cluster, estimator)), estimator,
                     prefetch=False)
    assert loads(submit(ctl, parent_and_child())) == []
    assert ctl.status().stats.prefetches == 0


def test_fate_no_prefetch_is_fate_with_the_controller_prefetch_off(tiny_cluster):
    ctl = make_controller(tiny_cluster, "fate-no-prefetch")
    assert loads(submit(ctl, parent_and_child())) == []


def test_the_generic_prefetch_prefers_a_sleeping_copy_and_skips_a_model_already_active(tiny_cluster):
    """b asleep on gpu3 (slow): woken there rather than loaded cold on an idle fast device. A second workflow
    needing b then gets no prefetch: b is ACTIVE somewhere."""
    ctl = make_controller(tiny_cluster, "least_loaded")
    ctl.handle(WorkerStateReported(GPU3, 0.0, {"b": "SLEEPING"}, {}))
    assert loads(submit(ctl, parent_and_child("w1"))) == [LoadModel(GPU3, "b", (), "wake", 0.0)]
    assert loads(submit(ctl, parent_and_child("w2"), 1.0)) == []


def test_the_generic_prefetch_does_not_evict_a_model_the_frontier_needs(tiny_cluster):
    """Slow devices only, both holding a. p (a) goes to gpu2; loading b (4 GiB) on idle gpu3 (5 GiB) would evict a
    (3 GiB), which the frontier needs: no prefetch. With a absent from gpu3, b is loaded there."""
    for gpu3_holds, expected in (({"a": "ACTIVE"}, []), ({}, [LoadModel(GPU3, "b", (), "load", 0.0)])):
        ctl = make_controller(tiny_cluster, "model_affinity")
        for device_id in (GPU0, GPU1):
            ctl.handle(WorkerLost(device_id, 0.0))
        ctl.handle(WorkerStateReported(GPU2, 0.0, {"a": "ACTIVE"}, {}))
        ctl.handle(WorkerStateReported(GPU3, 0.0, gpu3_holds, {}))
        commands = submit(ctl, parent_and_child())
        assert where(dispatches(commands)) == [("w", GPU2, (0,))]
        assert loads(commands) == expected


def test_the_generic_prefetch_skips_a_busy_device(tiny_cluster):
    """gpu0 runs w0 when w1 arrives; w1's p goes to gpu1. gpu0 is fast and has room for b, but it is busy: b is
    loaded on the fastest idle device, a slow one."""
    ctl = make_controller(tiny_cluster, "least_loaded")
    [w0] = dispatches(submit(ctl, workflow("w0", stage("s", "a", key=90))))
    assert w0.device_id == GPU0
    commands = submit(ctl, parent_and_child("w1"), 1.0)
    assert where(dispatches(commands)) == [("w1", GPU1, (0,))]
    assert loads(commands) == [LoadModel(GPU2, "b", (), "load", 1.0)]


class _OwnPrefetch(Policy):
    """Places everything on gpu0 and asks for its own prefetch of b on gpu3."""

    name = "test-own-prefetch"
    own_prefetch = True

    def plan(self, snapshot, frontier):
        return Plan(tuple(Assignment(f.key, GPU0, f.request_indices) for f in frontier), prefetch=(("b", GPU3),))


def test_a_policy_with_its_own_prefetch_replaces_the_generic_one(tiny_cluster):
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, _OwnPrefetch(PolicyContext(tiny_cluster, estimator)), estimator)
    assert loads(submit(ctl, parent_and_child())) == [LoadModel(GPU3, "b", (), "load", 0.0)]  # not gpu1


def test_an_unknown_queue_order_is_refused(tiny_cluster):
    estimator = CostEstimator(tiny_cluster)
    with pytest.raises(ValueError, match="unknown queue order 'lifo'; known: fifo, rank, arrival"):
        Controller(tiny_cluster, make_policy("heft", PolicyContext(tiny_cluster, estimator)), estimator,
                   queue_order="lifo")


def test_the_cli_offers_the_controllers_queue_orders_with_its_default_first():
    from fate_ray.cli import QUEUE_ORDERS as CLI_ORDERS

    assert set(CLI_ORDERS) == set(QUEUE_ORDERS) and CLI_ORDERS[0] == DEFAULT_QUEUE_ORDER


# Three workflows queue behind w0 on gpu2, the only live device. Placed in the order X, Y, Z; arrivals 2, 3, 1;
# upward ranks (prompt 40, 400, 200 tokens on a slow device) low, high, middle.
QUEUE_EXPECTED = {"fifo": ["X", "Y", "Z"], "arrival": ["Z", "X", "Y"], "rank": ["Y", "Z", "X"]}


@pytest.mark.parametrize("order", QUEUE_ORDERS)
@pytest.mark.parametrize("name", ALL_POLICIES)
def test_every_policy_runs_its_queues_in_the_controllers_order(tiny_cluster, name, order):
    estimator = CostEstimator(tiny_cluster)
    ctl = Controller(tiny_cluster, make_policy(name, PolicyContext(tiny_cluster, estimator)), estimator,
                     queue_order=order)
    assert ctl.queue_order == order
    for device_id in (GPU0, GPU1, GPU3):
        ctl.handle(WorkerLost(device_id, 0.0))
    [running] = dispatches(submit(ctl, workflow("w0", stage("s", "a")), 0.0))
    for wid, arrival_s, tokens, now_s, key in (("X", 2.0, 40, 2.0, 100), ("Y", 3.0, 400, 3.0, 200),
                                               ("Z", 1.0, 200, 4.0, 300)):
        prompts = ((TextPart(key, tokens),),)
        wf = workflow(wid, Stage("s", "a", (), 1, prompts, expected_output_tokens=10, max_tokens=20),
                      arrival_s=arrival_s)
        assert submit(ctl, wf, now_s) == []
    started = []
    for k in range(3):
        [running] = dispatches(finish(ctl, running, 10.0 + k))
        started.append(running.shard.workflow_id)
    assert started == QUEUE_EXPECTED[order]
    ctl.validate_state()


def test_predicted_hits_count_the_blocks_requests_running_on_the_model_compute():
    """vLLM caches a block as soon as it is computed: a copy of a running request's prompt, dispatched to the same
    device, is predicted to hit all of that prompt's full blocks (the planner's prediction real engines report)."""
    from pathlib import Path

    from fate_ray.schema.cluster import load_cluster
    from fate_ray.schema.workflow import load_workflow

    root = Path(__file__).resolve().parents[1]
    cluster = load_cluster(root / "workflows" / "clusters" / "local-cpu.yaml")
    wf = load_workflow(root / "workflows" / "support_answers.yaml", cluster)[1]
    estimator = CostEstimator(cluster)
    ctl = Controller(cluster, make_policy("least_loaded", PolicyContext(cluster, estimator, 0)), estimator,
                     predict_cache_hits=True)
    dispatched = [cmd for k in range(2) for cmd in ctl.handle(WorkflowSubmitted(wf.with_arrival(f"w{k}", 0.0), 0.0))
                  if isinstance(cmd, Dispatch)]
    first = {(d.device_id, i): d for d in dispatched if d.shard.workflow_id == "w0" for i in d.shard.request_indices}
    copies = [d for d in dispatched if d.shard.workflow_id == "w1"]
    assert copies
    for d in copies:
        for pos, i in enumerate(d.shard.request_indices):
            if (d.device_id, i) in first:  # the same prompt is being computed on this device
                full_blocks = d.shard.prompt_tokens[pos] // cluster.block_tokens * cluster.block_tokens
                assert d.predicted_cached_tokens[pos] == full_blocks
