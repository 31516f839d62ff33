"""The planner's journal and snapshots, without Ray: records survive a torn tail, a snapshot truncates the journal,
and a Controller restored from a pickle (with the recorded plans replayed) goes on exactly as the original."""

from __future__ import annotations

import pickle

from fate_ray.bench.drive import finish_everything
from fate_ray.controller import Controller
from fate_ray.cost import CostEstimator
from fate_ray.events import Dispatch, PlannerRestarted, ShardFinished, WorkflowSubmitted
from fate_ray.policies import PolicyContext, make_policy
from fate_ray.policies.base import PlanTimer
from fate_ray.runtime.journal import Journal, ReplayPolicy
from fate_ray.workload import Stage, TextPart, Workflow


def chain(wid: str, key: int) -> Workflow:
    a = Stage("a", "a", (), 4, tuple((TextPart(key + i, 40),) for i in range(4)), expected_output_tokens=10,
              max_tokens=20)
    b = Stage("b", "b", ("a",), 1, ((TextPart(key + 9, 40),),), expected_output_tokens=10, max_tokens=20)
    return Workflow(wid, "test", 0.0, {"a": a, "b": b}, ("a", "b"))


def controller(cluster) -> tuple[Controller, PlanTimer]:
    estimator = CostEstimator(cluster)
    timer = PlanTimer(make_policy("least_loaded", PolicyContext(cluster, estimator)))
    return Controller(cluster, timer, estimator), timer


def test_records_come_back_in_order_and_a_torn_tail_is_ignored(tmp_path):
    journal = Journal(tmp_path)
    for i in range(5):
        journal.append(("n", i))
    with open(journal.log_path, "ab") as fh:
        fh.write((1000).to_bytes(4, "big") + b"half a record")
    assert Journal(tmp_path).load() == (None, [("n", i) for i in range(5)])


def test_a_snapshot_truncates_the_journal(tmp_path):
    journal = Journal(tmp_path)
    journal.append(("before",))
    journal.snapshot({"state": 1})
    journal.append(("after",))
    assert Journal(tmp_path).load() == ({"state": 1}, [("after",)])


def test_a_restored_controller_replays_to_the_same_state_and_reruns_what_was_in_flight(tiny_cluster):
    """Drive a Controller, journalling (event, plan) as the planner actor does; restore it from a mid-run pickle
    plus the records after it; then both finish the run: the restored one re-dispatches exactly the requests that
    were in flight, and every request is recorded once."""
    ctl, timer = controller(tiny_cluster)
    records, snapshot = [], None
    running: list[Dispatch] = []

    def handle(event):
        rounds = len(timer.plan_ms)
        out = ctl.handle(event)
        records.append((event, timer.last_plan if len(timer.plan_ms) > rounds else None))
        running.extend(c for c in out if isinstance(c, Dispatch))
        return out

    handle(WorkflowSubmitted(chain("w1", 1), 0.0))
    snapshot = pickle.dumps(ctl)
    records.clear()
    handle(WorkflowSubmitted(chain("w2", 50), 0.5))
    first = running.pop(0)
    handle(ShardFinished(first.shard.shard_id, first.device_id, 1.0, (5,) * len(first.shard.request_indices)))
    in_flight = {(d.shard.workflow_id, d.shard.stage_id, i) for d in running for i in d.shard.request_indices}

    restored: Controller = pickle.loads(snapshot)
    replay = ReplayPolicy(own_prefetch=False)
    restored.policy = replay
    for event, plan in records:
        if plan is not None:
            replay.plans.append(plan)
        restored.handle(event)
    assert restored.status() == ctl.status()
    restored.policy = timer
    again = [c for c in restored.handle(PlannerRestarted(2.0)) if isinstance(c, Dispatch)]
    assert {(d.shard.workflow_id, d.shard.stage_id, i) for d in again for i in d.shard.request_indices} <= in_flight

    done = finish_everything(restored, again, 3.0)[0]
    assert sorted((d.workflow_id, d.ok) for d in done) == [("w1", True), ("w2", True)]
    assert restored.status().stats.duplicate_finishes == 0
    restored.validate_state()


def test_a_snapshot_another_version_wrote_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "snapshot.pkl").write_bytes(b"\x80\x05not a pickle of ours")
    try:
        Journal(tmp_path).load()
    except ValueError as exc:
        assert str(exc).startswith(f"{tmp_path / 'snapshot.pkl'}: the planner state there cannot be read")
        assert "empty --state-dir" in str(exc)
    else:
        raise AssertionError("an unreadable snapshot was accepted")


class _WrittenBefore:
    """Pickles as a Controller whose state has no format mark, as the versions before STATE_FORMAT wrote them."""

    def __init__(self, state: dict):
        self.state = state

    def __reduce__(self):
        return (object.__new__, (Controller,), self.state)


def test_a_controller_snapshot_of_an_older_format_is_refused_in_one_sentence(tmp_path, tiny_cluster):
    ctl, _ = controller(tiny_cluster)
    ctl.handle(WorkflowSubmitted(chain("w1", 100), 0.0))
    state = ctl.__getstate__()
    del state["_state_format"]
    Journal(tmp_path).snapshot(_WrittenBefore(state))
    try:
        Journal(tmp_path).load()
    except ValueError as exc:
        assert str(exc).startswith(f"{tmp_path / 'snapshot.pkl'}: the planner state there cannot be read")
    else:
        raise AssertionError("a snapshot without this version's format was restored")
    Journal(tmp_path).snapshot(ctl)  # this version's own snapshot still loads
    restored, _ = Journal(tmp_path).load()
    assert restored.workflows.keys() == ctl.workflows.keys()
