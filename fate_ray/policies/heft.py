"""HEFT, online: stages in decreasing upward rank; each request to the device with the earliest finish time.

Classical HEFT (Topcuoglu et al., 2002) adapted to a frontier that grows at run time: the rank is computed once per
workflow from stateless best-case estimates, and finish time = estimated free time + stateless service time on that
device type (so faster devices win). No state beyond the queue: it does not see residency or caches. Devices run
their queues in rank order.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, RoundLoad, group_assignments
from fate_ray.policies.registry import register


@register
class Heft(Policy):
    name = "heft"
    queue_order = "rank"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        choices = []
        for ready in sorted(frontier, key=lambda r: (-r.rank_s, r.arrival_s, r.key)):
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                service = {d.device.device_id: self.estimator.shard_cost(ready.model, d.device.type, [req], None)
                           .service_s for d in devices}
                dev_id = min(service, key=lambda k: load.free_at_s[k] + service[k])
                load.add(dev_id, service[dev_id])
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))
