"""LlmdScorer: the llm-d inference scheduler's default weighted scoring, per request.

llm-d's endpoint picker (built on the Gateway API Inference Extension) runs filter -> score -> pick for each
request. Its default scheduling profile weights three scorers: prefix-cache-scorer x3, queue-scorer x2,
kv-cache-utilization-scorer x2, then max-score-picker. Each score is in [0, 1], as the scorers define it:
- prefix cache: matched leading blocks of the prompt on the device / the prompt's blocks (0 for a prompt without
  a full block). The scorer's index of blocks per server is replaced by the device's real prefix cache for the
  model, plus the prompts this round already routed there (the prefix plugin records the routed request's blocks
  for its server after picking it).
- queue: (max q - q) / (max q - min q) over the candidates, 1 for every candidate when all are equal; q = requests
  queued or running on the device, counting this round's earlier picks (the scorer reads vLLM's waiting queue;
  the snapshot does not separate waiting from running requests).
- KV-cache utilisation: 1 - usage, usage = KV tokens of the model's requests running on the device (prompt +
  expected output) / the model's KV capacity there (`ModelSpec.cache_capacity_blocks` x block size), at most 1.
  Like vLLM's `kv_cache_usage`, cached blocks no running request holds count as free; a device that would have to
  load the model holds none of its KV (usage 0). Queued requests hold no KV, so this round's picks do not change it.
Filter: the devices that fit the model and hold it ACTIVE (an endpoint serving the model); when none does, every
device that fits it (it can load it). Pick: the highest weighted sum; ties go to the least loaded device (fewest
requests), then the device listed first (llm-d's picker breaks ties at random; we keep runs deterministic).
It does not see model loads beyond that filter, device speed, or the requests' lengths.
"""

from __future__ import annotations

from fate_ray.policies.base import Plan, Policy, RoundLoad, RoutedPrefixes, group_assignments
from fate_ray.policies.registry import register
from fate_ray.state import chain_blocks

PREFIX_WEIGHT = 3.0
QUEUE_WEIGHT = 2.0
KV_WEIGHT = 2.0


@register
class LlmdScorer(Policy):
    name = "llmd_scorer"

    def plan(self, snapshot, frontier):
        load = RoundLoad(snapshot)
        routed = RoutedPrefixes()
        block_tokens = self.cluster.block_tokens
        choices = []
        for ready in frontier:
            model = ready.model
            fitting = self.candidates(snapshot, model)
            devices = [d for d in fitting if d.state_of(model) == "ACTIVE"] or fitting
            capacity = self.cluster.models[model].cache_capacity_blocks(block_tokens) * block_tokens
            kv = {d.device.device_id: 1.0 - min(1.0, d.running_tokens.get(model, 0) / capacity)
                  if d.state_of(model) == "ACTIVE" else 1.0 for d in devices}
            caches = {d.device.device_id: d.caches.get(model, ()) for d in devices}  # caches: ACTIVE models only
            for index, req in zip(ready.request_indices, ready.requests):
                queues = {d.device.device_id: load.requests[d.device.device_id] for d in devices}
                low, high = min(queues.values()), max(queues.values())
                total = chain_blocks(req.block_hashes)
                scores = {}
                for dev_id, q in queues.items():
                    prefix = routed.matched_blocks(dev_id, model, caches[dev_id], req.block_hashes) / total if total else 0.0
                    queue = 1.0 if high == low else (high - q) / (high - low)
                    scores[dev_id] = PREFIX_WEIGHT * prefix + QUEUE_WEIGHT * queue + KV_WEIGHT * kv[dev_id]
                dev_id = min(scores, key=lambda k: (-scores[k], queues[k]))  # first listed on full ties
                load.add(dev_id, 0.0, model=model)
                routed.add(dev_id, model, caches[dev_id], req.block_hashes)
                choices.append((ready.key, dev_id, index))
        return Plan(group_assignments(choices))
