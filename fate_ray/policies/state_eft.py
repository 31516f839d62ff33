"""StateEFT: each frontier stage, in upward-rank order, to the device where it finishes first given the current
state, by the estimator FATE uses. No look-ahead, no joint solve: it isolates what FATE's future term and its
CP-SAT round add.

Finish of stage s on device d = d's backlog (running + queued work drained over its slots) + this round's earlier
placements on d (their activation + work over d's slots) + activation of s's model on d (0 if ACTIVE, or if an
earlier placement of this round loads it there; else wake or cold load) + `CostEstimator.shard_cost` of all of s's
requests as one batch on d's snapshot: transfer of parent outputs held on other nodes, prefill less d's prefix hits
for the model, batched decode. These are the terms of FATE's `immediate` score (fate/scoring.py), taken from
`shard_cost` directly. Prefix hits that an earlier placement of this round would leave on d, and evictions it would
cause, are not counted (as in FATE's greedy).

Stages go in decreasing upward rank (the Controller's `rank_s`), then oldest workflow. A stage that cannot be split
(or has fewer than 2 x `MIN_SHARD` requests) goes whole to its earliest-finish device. A shardable stage is split by
the earliest-finish water-filling of FATE's greedy (fate/greedy.py): over its `MAX_SHARDS` best devices by whole-
stage finish, each request to the device where it would finish first (a device's activation paid when it is
opened), then shards smaller than `MIN_SHARD` folded into the others; `MAX_SHARDS` and `MIN_SHARD` are FATE's
defaults. Which requests go where: FATE's `split_requests` (each device's count, requests to the device that caches
them best).
"""

from __future__ import annotations

from fate_ray.policies.base import Assignment, Plan, Policy, ReadyStage, rank_order
from fate_ray.policies.fate.config import FateConfig
from fate_ray.policies.fate.greedy import RoundLedger, greedy_counts
from fate_ray.policies.fate.planner import split_requests
from fate_ray.policies.fate.scoring import Candidate, Terms
from fate_ray.policies.registry import register
from fate_ray.state import ClusterSnapshot, DeviceSnapshot

SPLIT = FateConfig()  # only max_shards and min_shard are read
MAX_SHARDS = SPLIT.max_shards
MIN_SHARD = SPLIT.min_shard


@register
class StateEft(Policy):
    name = "state_eft"

    def plan(self, snapshot, frontier):
        ledger = RoundLedger()
        by_id = {d.device.device_id: d for d in snapshot.devices}
        out: list[Assignment] = []
        for s in rank_order(frontier):
            cands = sorted((self.candidate(s, d, snapshot) for d in self.candidates(snapshot, s.model)),
                           key=lambda c: (c.score_s, c.device_id))
            counts = greedy_counts([s], {s.key: cands}, SPLIT, ledger)[s.key]  # places them on the ledger too
            out += [Assignment(s.key, d, idx)
                    for d, idx in split_requests(s, counts, by_id, self.cluster.block_tokens).items()]
        return Plan(tuple(out))

    def candidate(self, s: ReadyStage, d: DeviceSnapshot, snapshot: ClusterSnapshot) -> Candidate:
        """The whole stage on d as FATE's greedy sees a candidate: queue, activation, service; no future terms."""
        cost = self.estimator.shard_cost(s.model, d.device.type, s.requests, d, node=d.device.node,
                                         input_bytes_by_node=s.input_bytes_by_node)
        queue_s = max(0.0, d.free_at_s - snapshot.now_s)
        service_s = cost.transfer_s + cost.prefill_s + cost.decode_s
        terms = Terms(queue_s, cost.activation_s, service_s, 0.0, 0.0, 0.0, 0.0, 0.0)
        return Candidate(s.key, d.device.device_id, s.model, d.concurrency, terms, terms.immediate_s,
                         len(s.requests))
