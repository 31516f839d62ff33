"""A solver-agnostic check of a plan: what any assignment of a round must satisfy, whoever computed it."""

from __future__ import annotations

from collections.abc import Sequence

from fate_ray.policies.base import Plan, ReadyStage
from fate_ray.policies.fate.config import FateConfig
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot


class InvalidPlan(AssertionError):
    """A planner bug: the plan breaks a rule of the round (never a user error)."""


def validate_plan(plan: Plan, frontier: Sequence[ReadyStage], snapshot: ClusterSnapshot, cluster: ClusterSpec,
                  cfg: FateConfig) -> None:
    """Every request of every frontier stage placed exactly once, on a live device that fits its model; a stage
    on at most `max_shards` devices; no shard below `min_shard` unless the stage is that small; unsplittable
    stages on one device."""
    live = {d.device.device_id: d for d in snapshot.devices if d.alive}
    stages = {s.key: s for s in frontier}
    placed: dict = {key: [] for key in stages}
    devices: dict = {key: [] for key in stages}
    for a in plan.assignments:
        if a.stage not in stages:
            raise InvalidPlan(f"{a.stage} is not on the frontier")
        dev = live.get(a.device_id)
        if dev is None or not cluster.fits(stages[a.stage].model, dev.device.type):
            raise InvalidPlan(f"{a.stage} placed on {a.device_id!r}, not a live device that fits its model")
        placed[a.stage] += a.request_indices
        devices[a.stage].append((a.device_id, len(a.request_indices)))
    for key, s in stages.items():
        if sorted(placed[key]) != sorted(s.request_indices):
            raise InvalidPlan(f"{key}: requests placed {sorted(placed[key])} != ready {list(s.request_indices)}")
        used = devices[key]
        if len({d for d, _ in used}) != len(used):
            raise InvalidPlan(f"{key}: two shards on one device")
        if len(used) > (cfg.max_shards if s.shardable else 1):
            raise InvalidPlan(f"{key}: {len(used)} shards")
        if len(used) > 1 and min(n for _, n in used) < min(cfg.min_shard, len(s.request_indices)):
            raise InvalidPlan(f"{key}: a shard smaller than {cfg.min_shard}")
