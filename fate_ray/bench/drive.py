"""Driving a pure Controller without engines: finish every dispatched shard, one per second, until nothing runs
(the load bench and the Controller tests)."""

from __future__ import annotations

from collections.abc import Iterable

from fate_ray.controller import Controller
from fate_ray.events import Dispatch, ShardFinished, WorkflowDone


def finish_everything(ctl: Controller, running: Iterable[Dispatch], now_s: float) -> tuple[list[WorkflowDone],
                                                                                           list[Dispatch]]:
    """Finish `running` and every shard dispatched meanwhile (5 output tokens per request); returns the workflows
    that ended and the shards dispatched on the way."""
    todo, done, dispatched = list(running), [], []
    while todo:
        d = todo.pop(0)
        for c in ctl.handle(ShardFinished(d.shard.shard_id, d.device_id, now_s, (5,) * len(d.shard.request_indices))):
            if isinstance(c, Dispatch):
                todo.append(c)
                dispatched.append(c)
            elif isinstance(c, WorkflowDone):
                done.append(c)
        now_s += 1.0
    return done, dispatched
