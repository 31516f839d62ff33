"""Greedy assignment on FATE's scores: the `fate-greedy` ablation, the CP-SAT warm start and its fallback.

Stages in decreasing upward rank. A stage that cannot be split goes to the candidate with the lowest score after
this round's earlier placements (their work delays the device; a model they activate is resident, so its load is
paid once). A shardable stage is water-filled over its best `max_shards` candidates: each request goes where it
would finish first, a device's activation and look-ahead offset paid when it is opened; then shards smaller than
`min_shard` are folded into the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fate_ray.events import StageKey
from fate_ray.policies.base import ReadyStage, rank_order
from fate_ray.policies.fate.config import FateConfig
from fate_ray.policies.fate.scoring import Candidate

Counts = dict[StageKey, dict[str, int]]  # stage -> device -> number of requests


class RoundLedger:
    """What earlier placements of this round did to each device: added backlog, models made resident."""

    def __init__(self) -> None:
        self.extra_s: dict[str, float] = {}
        self.activated: set[tuple[str, str]] = set()

    def activation_s(self, c: Candidate) -> float:
        return 0.0 if (c.model, c.device_id) in self.activated else c.terms.activation_s

    def ready_s(self, c: Candidate) -> float:
        """When a first request of the stage could start on the device, relative to now."""
        return c.terms.queue_s + self.extra_s.get(c.device_id, 0.0) + self.activation_s(c)

    def place(self, c: Candidate, num_requests: int) -> None:
        work_s = self.activation_s(c) + c.per_request_s * num_requests
        self.extra_s[c.device_id] = self.extra_s.get(c.device_id, 0.0) + work_s / c.concurrency
        self.activated.add((c.model, c.device_id))


def greedy_counts(frontier: Sequence[ReadyStage], candidates: Mapping[StageKey, list[Candidate]],
                  cfg: FateConfig, ledger: RoundLedger | None = None) -> Counts:
    ledger = ledger or RoundLedger()
    out: Counts = {}
    for s in rank_order(frontier):
        cands = candidates[s.key]
        total = len(s.request_indices)
        if not s.shardable or total < 2 * cfg.min_shard or cfg.max_shards == 1:
            best = min(cands, key=lambda c: (c.score_s - c.terms.queue_s - c.terms.activation_s
                                             + ledger.ready_s(c), c.device_id))
            counts = {best.device_id: total}
        else:
            counts = _water_fill(cands[: cfg.max_shards], total, cfg.min_shard, ledger)
        by_id = {c.device_id: c for c in cands}
        for device_id, n in counts.items():
            ledger.place(by_id[device_id], n)
        out[s.key] = counts
    return out


def _water_fill(cands: Sequence[Candidate], total: int, min_shard: int, ledger: RoundLedger) -> dict[str, int]:
    n = {c.device_id: 0 for c in cands}

    def finish_if_added(c: Candidate) -> float:
        opened = n[c.device_id] > 0
        base = ledger.ready_s(c) + (0.0 if opened else c.offset_s)
        return base + (n[c.device_id] + 1) * c.per_request_s / c.concurrency

    for _ in range(total):
        best = min(cands, key=lambda c: (finish_if_added(c), c.device_id))
        n[best.device_id] += 1
    # Fold shards below min_shard into the best opened device (smallest first).
    order = {c.device_id: i for i, c in enumerate(cands)}
    while True:
        small = [d for d, k in n.items() if 0 < k < min_shard]
        opened = [d for d, k in n.items() if k > 0]
        if not small or len(opened) == 1:
            break
        victim = min(small, key=lambda d: (n[d], -order[d]))
        keep = min((d for d in opened if d != victim), key=lambda d: order[d])
        n[keep] += n[victim]
        n[victim] = 0
    return {d: k for d, k in n.items() if k > 0}
