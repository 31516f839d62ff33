"""RoundRobin: each request goes to the next live device that fits its model, in a fixed cycle.

The normaliser of every benchmark (= 1.0). One cycle position per model's device set, so a model that fits only
some devices still cycles over all of them. Looks at nothing else: no queue, no residency, no cache.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, group_assignments
from fate_ray.policies.registry import register


@register
class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._next: dict[tuple[str, ...], int] = {}

    def plan(self, snapshot, frontier):
        choices = []
        for ready in frontier:
            devices = tuple(d.device.device_id for d in self.candidates(snapshot, ready.model))
            for index in ready.request_indices:
                k = self._next.get(devices, 0)
                choices.append((ready.key, devices[k % len(devices)], index))
                self._next[devices] = k + 1
        return Plan(group_assignments(choices))
