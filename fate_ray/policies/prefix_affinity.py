"""PrefixAffinity: the SGLang router's `cache_aware` policy, per request, over the devices that fit the model.

Rule (sgl-router `policies/cache_aware.rs`, `select_worker`), load = requests queued or running on a device:
1. Imbalanced load (max - min > `balance_abs_threshold` AND max > `balance_rel_threshold` x min): the device with
   the fewest requests (shortest queue).
2. Balanced: the device whose cache holds the longest prefix of the prompt, if the match rate (matched tokens /
   prompt tokens) is above `cache_threshold` (strictly, as in the router); otherwise the device with the smallest
   cache tree (fewest cached blocks of this model: the most free cache, in the router's words).
The routed prompt is then added to the chosen device's tree (the router inserts a request's text when routing it),
so later requests of the round see it.

Defaults are the router's current ones (sgl-router `RouterArgs`/`launch_router`): cache_threshold 0.3,
balance_abs_threshold 64, balance_rel_threshold 1.5. Early releases of the router shipped 0.5 / 32 / 1.0001; the
0.5 in our issue text is that older threshold.

Mapping to this cluster. The router's approximate radix tree of characters is replaced by the device's real prefix
cache of blocks for the model, plus the prompts this round already routed there. Residency-aware as the router
is per model (one tree per model, over the workers that serve it): only devices that fit the model are
candidates, and a device without the model ACTIVE has an empty tree for it (its KV cache is gone). The router knows
nothing of model loads, so a load cost does not enter the rule; it only breaks ties between equal trees (ACTIVE,
then SLEEPING, then absent; then fewer requests; then the device listed first). Consequence, faithful to the rule:
a low-match request goes to the smallest tree, often a device that must load the model first.
"""

from __future__ import annotations

from fate_ray.policies.base import RESIDENCY_TIER, Plan, Policy, RoundLoad, RoutedPrefixes, group_assignments
from fate_ray.policies.registry import register

CACHE_THRESHOLD = 0.3
BALANCE_ABS_THRESHOLD = 64
BALANCE_REL_THRESHOLD = 1.5


@register
class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        routed = RoutedPrefixes()  # a device's tree = its cache + what was routed there this round
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            trees = {d.device.device_id: d.caches.get(ready.model, ()) for d in devices}  # caches: ACTIVE only
            for index, req in zip(ready.request_indices, ready.requests):
                dev_id = self._route(ready.model, req, devices, trees, routed, load)
                load.add(dev_id, 0.0, model=ready.model)
                routed.add(dev_id, ready.model, trees[dev_id], req.block_hashes)
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))

    def _route(self, model: str, req, devices, trees, routed: RoutedPrefixes, load: RoundLoad) -> str:
        requests = load.requests
        loads = [requests[d.device.device_id] for d in devices]
        if max(loads) - min(loads) > BALANCE_ABS_THRESHOLD and max(loads) > BALANCE_REL_THRESHOLD * min(loads):
            return min(devices, key=lambda d: requests[d.device.device_id]).device.device_id  # shortest queue
        matched = {}
        for d in devices:
            dev_id = d.device.device_id
            matched[dev_id] = routed.matched_blocks(dev_id, model, trees[dev_id], req.block_hashes)
        best = min(matched, key=lambda k: (-matched[k], requests[k]))  # longest match, then fewer requests
        if matched[best] * self.cluster.block_tokens / max(1, req.prompt_tokens) > CACHE_THRESHOLD:
            return best

        def tree_size(d) -> tuple:
            dev_id = d.device.device_id
            return (len(trees[dev_id]) + routed.blocks(dev_id, model), RESIDENCY_TIER[load.state_of(d, model)],
                    requests[dev_id])

        return min(devices, key=tree_size).device.device_id  # smallest tree
