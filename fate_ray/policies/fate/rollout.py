"""FATE's look-ahead as a greedy rollout: what placing frontier stage s on device d leaves its descendants.

For a candidate (s, d) the rollout starts from the state the placement induces (d busy for s's work, m(s) ACTIVE on
d and the models it evicts gone, s's context cached on d) and places the horizon stages (descendants within H hops,
parents before children) one by one, each on the device where it would finish first *in the rollout's state*:

    finish(h, e) = max(free_e, ready_h) + activation(m(h) on e) + service(h on e) - locality(h, e) - prefix(h, e)

where ready_h is its parents' finish in the rollout (s's for a child of s), activation is 0 for a model the rollout
has made ACTIVE on e (and a load for one it evicted), locality is the prefill a stage saves by continuing its
parent's context on the device that parent ran on, and prefix the prefill saved on d for leading prompt text it
shares with s. Placing h makes e busy for its work (spread over e's slots) and m(h) ACTIVE there, so siblings
compete for devices and models as they will. The rollout's cost is sum_h w_h finish(h), with w_h = rank(h) /
rank(s) (descendants on s's critical path weigh most), split into what made it: activation (residency), locality,
prefix, and the rest (the descendants' ready, wait and service times: occupancy).

Candidates of one stage are compared by their rollouts: the scorer subtracts the best candidate's, so `future` is
what this choice costs the descendants over the best choice (>= 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fate_ray.policies.base import ReadyStage
from fate_ray.policies.fate.config import FateConfig
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import DeviceSnapshot
from fate_ray.workload import ContextPart, TextPart


@dataclass(frozen=True, slots=True)
class HorizonStage:
    """A descendant of the frontier stage, in rollout order (parents before children)."""

    stage_id: str
    model: str
    weight: float  # rank(h) / rank(s)
    parents: tuple[str, ...]  # its parents within the rollout (s or earlier horizon stages)
    continues: str | None  # the rollout stage whose context its prompt continues
    context_tokens: int  # tokens of that context (its prompt + expected output)
    shared_tokens: int  # leading prompt tokens it shares with s
    footprint_gib: float


@dataclass(frozen=True, slots=True)
class RolloutCost:
    """sum_h w_h finish(h), in seconds, and its parts."""

    total_s: float
    residency_s: float
    locality_s: float
    prefix_s: float
    occupancy_s: float


ZERO = RolloutCost(0.0, 0.0, 0.0, 0.0, 0.0)


def horizon(s: ReadyStage, cfg: FateConfig, cluster: ClusterSpec) -> tuple[HorizonStage, ...]:
    """s's descendants within `horizon_hops`, the `horizon_max_stages` of highest rank, parents first; without the
    locality or prefix dimension (an ablation) no context or shared text is credited. Memoised on the DAG: it depends
    on the DAG and the settings only."""
    dag: DagInfo | None = s.dag
    if dag is None or cfg.horizon_hops == 0:
        return ()
    key = ("fate.horizon", s.key[1], cfg.horizon_hops, cfg.horizon_max_stages, cfg.locality, cfg.prefix)
    stages = dag.memo.get(key)
    if stages is None:
        stages = dag.memo[key] = _horizon(dag, s.key[1], cfg, cluster)
    return stages


def _horizon(dag: DagInfo, sid: str, cfg: FateConfig, cluster: ClusterSpec) -> tuple[HorizonStage, ...]:
    lead = _first_part(dag, sid)
    found: list[tuple[int, str]] = []
    seen, layer = {sid}, [sid]
    for hop in range(1, cfg.horizon_hops + 1):
        nxt = list(dict.fromkeys(c for u in layer for c in dag.children[u] if c not in seen))
        seen.update(nxt)
        found += [(hop, c) for c in nxt]
        layer = nxt
    # The highest-ranked ones, then back in hop order (a parent is always fewer hops away than its child).
    kept = sorted(found, key=lambda hc: -dag.ranks_s[hc[1]])[:cfg.horizon_max_stages]
    kept.sort(key=lambda hc: hc[0])
    inside = {sid} | {c for _, c in kept}
    rank_s = dag.ranks_s[sid] or 1.0
    out = []
    for _, c in kept:
        st = dag.stages[c]
        first = _first_part(dag, c)
        continues, context = None, 0
        if cfg.locality and isinstance(first, ContextPart) and first.parent in inside:
            continues = first.parent
            context = dag.prompt_tokens[first.parent][first.item] + dag.stages[first.parent].expected_output_tokens
        shared = 0
        if cfg.prefix and isinstance(lead, TextPart) and isinstance(first, TextPart) and first.key == lead.key:
            shared = lead.tokens
        out.append(HorizonStage(c, st.model, dag.ranks_s[c] / rank_s, tuple(p for p in st.parents if p in inside),
                                continues, context * st.num_requests, shared * st.num_requests,
                                cluster.models[st.model].footprint_gib))
    return tuple(out)


def _ready_s(parents: Sequence[str], finish: Mapping[str, float], default_s: float) -> float:
    """The latest finish of h's parents placed in the rollout (`default_s`, s's finish, if none was): the
    `max(..., default=...)` of a generator, spelled out (it is called for every horizon stage of every rollout)."""
    ready = None
    for p in parents:
        f = finish.get(p)
        if f is not None and (ready is None or f > ready):
            ready = f
    return default_s if ready is None else ready


def _first_part(dag: DagInfo, stage_id: str):
    prompts = dag.stages[stage_id].prompts
    return prompts[0][0] if prompts and prompts[0] else None


class Rollout:
    """One planning round's rollouts. `options[h]` lists, per live device that fits h's model: id(device), the
    device, its concurrency, the activation of h's model there now and after an eviction, h's stateless service there
    and the prefill seconds saved per cached token (the Scorer's `_options`)."""

    def __init__(self, cluster: ClusterSpec, live: Sequence[DeviceSnapshot], now_s: float):
        self.cluster = cluster
        self.free0 = {id(d): max(0.0, d.free_at_s - now_s) for d in live}
        self.active0 = {id(d): frozenset(m for m, r in d.residency.items() if r == "ACTIVE") for d in live}

    def cost(self, s: ReadyStage, d: DeviceSnapshot, finish_s: float, occupy_s: float, evicts: Sequence[str],
             stages: Sequence[HorizonStage], options: Mapping[str, list[tuple]]) -> RolloutCost:
        if not stages:
            return ZERO
        free = dict(self.free0)
        free[id(d)] += occupy_s
        active = dict(self.active0)
        active[id(d)] = (active[id(d)] - set(evicts)) | {s.model}
        evicted = {(id(d), m) for m in evicts}
        finish = {s.key[1]: finish_s}
        where = {s.key[1]: id(d)}
        d_key = id(d)
        residency = locality = prefix = occupancy = 0.0
        for h in stages:
            opts = options[h.stage_id]
            if not opts:
                continue  # its model fits no live device: the Controller fails that workflow, not the planner
            ready = _ready_s(h.parents, finish, finish_s)
            model, shared = h.model, h.shared_tokens
            continued_on = where.get(h.continues) if h.continues else None
            shared_on = d_key if shared else None
            # The inner loop is the planner's hottest: conditionals rather than max(), keys precomputed.
            best = None
            best_done = math.inf
            for key, e, conc, act_now, act_cold, service, hit_s_per_token in opts:
                if model in active[key]:
                    act = 0.0
                else:
                    act = act_cold if (key, model) in evicted else act_now
                start = free[key]
                if ready > start:
                    start = ready
                # NOTE: only the device h continues a context on and s's device (shared text) can save prefill;
                # elsewhere the work is the option's stateless service as is (never negative), which skips
                # two products and two subtractions per option.
                if key == continued_on or key == shared_on:
                    loc = h.context_tokens * hit_s_per_token if key == continued_on else 0.0
                    pre = shared * hit_s_per_token if key == shared_on else 0.0
                    work = service - loc - pre
                    if work < 0.0:
                        work = 0.0
                else:
                    loc = pre = 0.0
                    work = service
                done = start + act + work
                if best is None or done < best_done:
                    best_done = done
                    best = (key, e, conc, start, act, loc, pre, service, work)
            key, e, conc, start, act, loc, pre, service, work = best
            free[key] = start + (act + work) / conc
            if model not in active[key]:
                active[key] = self._make_room(e, active[key], h, evicted) | {model}
            finish[h.stage_id] = best_done
            where[h.stage_id] = key
            w = h.weight
            residency += w * act
            # min() and max() spelled as conditionals (same values: min/max keep the first of equals)
            locality -= w * (service if service < loc else loc)
            rest = service - loc
            if not rest > 0.0:
                rest = 0.0
            prefix -= w * (rest if rest < pre else pre)
            occupancy += w * (start + service)
        total = residency + locality + prefix + occupancy
        return RolloutCost(total, residency, locality, prefix, occupancy)

    def _make_room(self, e: DeviceSnapshot, active: frozenset, h: HorizonStage, evicted: set) -> frozenset:
        """Models that stay when h's model becomes ACTIVE on e: the busy ones, then as many others as fit."""
        models = self.cluster.models
        room = e.memory_gib - h.footprint_gib
        keep = []
        for m in sorted(active, key=lambda m: (m not in e.busy_models, m)):
            if models[m].footprint_gib <= room or m in e.busy_models:
                keep.append(m)
                room -= models[m].footprint_gib
            else:
                evicted.add((id(e), m))
        return frozenset(keep)
