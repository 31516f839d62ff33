"""ModelAffinity: prefer a device where the request's model is warm, then the earliest estimated finish.

The locality-first rule of serverless LLM serving: route to a warm replica to avoid a cold start; where the model
is not warm, the startup time differs by where its weights are (ServerlessLLM, Fu et al., OSDI 2024, estimates it
per storage tier; here a wake from host RAM or a cold load). The strict tier order is this baseline's simplification
(ServerlessLLM minimises estimated startup time alone). Residency tiers, best first:
ACTIVE on the device (or sent there by an earlier placement of this round: that load will have happened by then),
SLEEPING (weights in host RAM: a wake, not a cold load), then the rest. Within the best non-empty tier, the device
with the earliest estimated finish wins: backlog (drained over its slots, this round included) + activation (0,
wake or load time, `CostEstimator.activation_s`) + the request's stateless service on that device type. Ties go to
the device listed first. It does not see caches or the requests' prompts.
"""

from __future__ import annotations

from fate_ray.policies.base import RESIDENCY_TIER, Plan, Policy, RoundLoad, StatelessService, group_assignments
from fate_ray.policies.registry import register


@register
class ModelAffinity(Policy):
    name = "model_affinity"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        service = StatelessService(self.estimator)  # per round: calibration moves between rounds
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                best_id, best_key, best_work = "", (3, float("inf")), 0.0
                for d in devices:
                    dev_id = d.device.device_id
                    state = load.state_of(d, ready.model)
                    work = service.with_activation(ready.model, d.device.type, req, state)
                    key = (RESIDENCY_TIER[state], load.free_at_s[dev_id] + work)
                    if key < best_key:
                        best_id, best_key, best_work = dev_id, key, work
                load.add(best_id, best_work, model=ready.model)
                choices.append((ready.key, best_id, index))
        return Plan(group_assignments(choices))
