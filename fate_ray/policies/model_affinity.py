"""ModelAffinity: prefer a device where the request's model is resident, else the least loaded one.

The locality rule of serverless LLM serving (ServerlessLLM-style): avoid cold starts by routing to warm replicas.
"Resident" includes models this round already sent to a device (that load will have happened by then). Among warm
devices, and when there is none, the earliest estimated free time wins.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, RoundLoad, group_assignments
from fate_ray.policies.registry import register


@register
class ModelAffinity(Policy):
    name = "model_affinity"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        warm = {(d.device.device_id, m) for d in snapshot.devices for m, r in d.residency.items() if r == "ACTIVE"}
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                hot = [d for d in devices if (d.device.device_id, ready.model) in warm] or devices
                best = min(hot, key=lambda d: load.free_at_s[d.device.device_id])
                dev_id = best.device.device_id
                load.add(dev_id, self.estimator.shard_cost(ready.model, best.device.type, [req], None).service_s)
                warm.add((dev_id, ready.model))
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))
