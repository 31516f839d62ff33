"""LeastLoaded: each request goes to the fitting device whose backlog drains first (earliest estimated free time).

The backlog includes what this round already placed. Service time is estimated statelessly (model resident, no
cache): the policy sees the queue and nothing else.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, RoundLoad, group_assignments
from fate_ray.policies.registry import register


@register
class LeastLoaded(Policy):
    name = "least_loaded"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                best = min(devices, key=lambda d: load.free_at_s[d.device.device_id])
                dev_id = best.device.device_id
                load.add(dev_id, self.estimator.shard_cost(ready.model, best.device.type, [req], None).service_s)
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))
