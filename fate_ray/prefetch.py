"""The generic prefetch every policy runs with (a Controller feature, on by default): pure, one home for the rule.

After a planning round, for the children of the frontier stages (highest upward rank first), load a child's model
ahead when it would otherwise be a cold start:
- no live device has the model ACTIVE, and this round's placements do not load it (no frontier stage uses it);
- on an idle device: nothing running, nothing queued (its backlog has drained), nothing placed this round;
- that fits the model, where the load is feasible now and evicts no model a frontier stage or one of these children
  needs;
- a device holding the model SLEEPING first (a wake is cheaper than a load), then the fastest (highest
  `prefill_tok_s` for the model), then the lowest device index. One prefetch per device per round.

This was FATE's own prefetch (`FatePolicy._prefetch`) until every policy got it. A policy that declares
`own_prefetch = True` replaces it with its own `Plan.prefetch` (possibly none).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from fate_ray.cost import CostEstimator
from fate_ray.policies.base import ReadyStage, rank_order
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot


def child_models(frontier: Sequence[ReadyStage]) -> list[str]:
    """Models of the frontier stages' children, highest-ranked parent first, each once."""
    out: dict[str, None] = {}
    for s in rank_order(frontier):
        if s.dag is not None:
            for c in s.dag.children[s.key[1]]:
                out.setdefault(s.dag.stages[c].model)
    return list(out)


def generic_prefetch(snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage], placed_on: Collection[str],
                     cluster: ClusterSpec, estimator: CostEstimator) -> tuple[tuple[str, str], ...]:
    """(model, device id) loads to start after this round; `placed_on`: devices this round's plan uses."""
    idle = [d for d in snapshot.devices if d.alive and d.running_shards == 0 and d.free_at_s <= snapshot.now_s
            and d.device.device_id not in placed_on]
    if not idle:  # the usual case on a busy cluster: skip the frontier walk
        return ()
    children = child_models(frontier)
    if not children:
        return ()
    models = cluster.models
    frontier_models = {s.model for s in frontier}  # every frontier stage is placed: its model becomes resident
    needed = frontier_models | set(children)
    out: list[tuple[str, str]] = []
    for model in children:
        if not idle:
            break
        if model in frontier_models:
            continue
        fitting = [d for d in snapshot.devices if d.alive and cluster.fits(model, d.device.type)]
        if any(d.state_of(model) == "ACTIVE" for d in fitting):
            continue
        options = []
        for d in idle:
            if not cluster.fits(model, d.device.type):
                continue
            act = d.plan_activation(model, models)
            if act.feasible and not set(act.evict) & needed:
                options.append(d)
        if not options:
            continue
        best = min(options, key=lambda d: (d.state_of(model) != "SLEEPING",
                                           -estimator.profile(model, d.device.type).prefill_tok_s, d.device.index))
        out.append((model, best.device.device_id))
        idle.remove(best)
    return tuple(out)
