"""Random: each request goes to a uniformly random live device that fits its model (seeded)."""

from __future__ import annotations

import random

from fate_ray.policies.base import Plan, Policy, group_assignments
from fate_ray.policies.registry import register


@register
class RandomPolicy(Policy):
    name = "random"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._rng = random.Random(ctx.seed)

    def plan(self, snapshot, frontier):
        choices = []
        for ready in frontier:
            devices = [d.device.device_id for d in self.candidates(snapshot, ready.model)]
            choices += [(ready.key, self._rng.choice(devices), i) for i in ready.request_indices]
        return Plan(group_assignments(choices))
