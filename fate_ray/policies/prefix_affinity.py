"""PrefixAffinity: the SGLang cache-aware router's rules, per request.

Strategy (SGLang `cache_aware` router): if the load is balanced, send the request to the device whose cache holds
the longest prefix of its prompt, provided the match ratio (matched / prompt tokens) is at least
`cache_threshold`; otherwise (low match, or imbalance) send it to the device with the fewest requests.
Imbalance = max load - min load > `balance_abs_threshold` AND max load > `balance_rel_threshold` x min load,
with load = requests queued or running on the device.

Parameters (SGLang's defaults): cache_threshold = 0.3, balance_abs_threshold = 64, balance_rel_threshold = 1.5.
The router's approximate radix tree is replaced by the device's real prefix cache, plus the prompts this round has
already routed there (SGLang inserts a request's text into the tree when routing it).
"""

from __future__ import annotations

from collections.abc import Container

from fate_ray.policies.base import Plan, Policy, RoundLoad, group_assignments
from fate_ray.policies.registry import register
from fate_ray.state import prefix_match

CACHE_THRESHOLD = 0.3
BALANCE_ABS_THRESHOLD = 64
BALANCE_REL_THRESHOLD = 1.5


@register
class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        routed: dict[tuple[str, str], set[int]] = {}  # (device, model) -> blocks routed there this round
        block = self.cluster.block_tokens
        choices = []
        for ready in frontier:
            devices = self.candidates(snapshot, ready.model)
            for index, req in zip(ready.request_indices, ready.requests):
                loads = [load.requests[d.device.device_id] for d in devices]
                imbalanced = (max(loads) - min(loads) > BALANCE_ABS_THRESHOLD
                              and max(loads) > BALANCE_REL_THRESHOLD * min(loads))
                best, best_ratio = None, 0.0
                for d in devices:
                    held = _Either(d.caches.get(ready.model, ()), routed.get((d.device.device_id, ready.model), ()))
                    n = prefix_match(held, req.block_hashes)
                    ratio = n * block / max(1, req.prompt_tokens)
                    if ratio > best_ratio:
                        best, best_ratio = d, ratio
                if imbalanced or best is None or best_ratio < CACHE_THRESHOLD:
                    best = min(devices, key=lambda d: load.requests[d.device.device_id])
                dev_id = best.device.device_id
                load.add(dev_id, 0.0)
                routed.setdefault((dev_id, ready.model), set()).update(req.block_hashes)
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))


class _Either:
    """Blocks held by either of two containers. The union of two prefix-closed sets (the device's cache, the
    prompts routed there this round) is prefix-closed, so `prefix_match` may binary-search it."""

    __slots__ = ("first", "second")

    def __init__(self, first: Container[int], second: Container[int]):
        self.first, self.second = first, second

    def __contains__(self, block: object) -> bool:
        return block in self.first or block in self.second
