"""LeastLoaded: each request goes to the fitting device where it would finish first, given the queues.

The classic least-loaded / earliest-completion rule of load balancers that know each server's speed: the device's
estimated backlog (running + queued work, including what this round already placed there, drained over its
concurrent slots) plus this request's stateless service time on that device type (model resident, empty cache).
So a fast device with a short queue beats an idle slow one when the request finishes there sooner. It sees the
queue and the device speed, nothing else: no residency (loads), no caches. Frontier order; ties go to the device
listed first in the cluster.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, RoundLoad, StatelessService, group_assignments
from fate_ray.policies.registry import register


@register
class LeastLoaded(Policy):
    name = "least_loaded"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        service = StatelessService(self.estimator)  # per round: calibration moves between rounds
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                cost = {d.device.device_id: service(ready.model, d.device.type, req) for d in devices}
                dev_id = min(cost, key=lambda k: load.free_at_s[k] + cost[k])  # first listed on ties
                load.add(dev_id, cost[dev_id])
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))
