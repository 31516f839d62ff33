"""FATE: future-state-aware frontier planning with CP-SAT (Huang et al., arXiv 2605.07238), as we build it.

One planning round:
    frontier F -> horizon L(s) (descendants within H hops) -> candidates (s, d) scored
    `immediate + lam * future` term by term (scoring.py) -> top-k devices per stage -> CP-SAT (or greedy)
    -> request counts per (stage, device) -> requests split to the devices that cache them best -> Plan.
Queue order and prefetch are not FATE's: every policy gets the Controller's (controller.py). FATE once ordered its
queues oldest workflow first and loaded its frontier's children's models ahead on idle devices; both rules are now
Controller features every baseline runs with too (`queue_order`, fate_ray/prefetch.py). FATE returns no
`Plan.prefetch` of its own: the `prefetch` setting only opts it out of the Controller's generic prefetch, so the
`fate-no-prefetch` ablation is FATE with the Controller's prefetch off (`own_prefetch`, with no prefetch of its
own). A horizon-driven prefetch of FATE's own would have to beat the generic one to earn its place.

CP-SAT formulation (cpsat.py follows these numbered blocks). Notation: F frontier stages; D(s) top-k candidates
of s; R_s requests of s; c_d concurrency of d; q_d its current backlog (ms); m(s) the model of s;
act[m,d] load or wake time of m on d (ms, 0 if ACTIVE); p[s,d] service per request of s on d (ms);
o[s,d] the candidate's look-ahead and reach terms (ms, lam-weighted, evictions excluded: they are explicit);
ev[m,d] the reload cost of idle model m on d if evicted while other pending stages need it; w_s = 1 + rank_s /
max rank + age_s / max age (age: how long its workflow has been in the system); K max shards; mu min shard;
s' <=_d s: s' is at or ahead of s in d's queue order (oldest workflow first, then upward rank).
    variables  x[s,d] in {0,1}, r[s,d] in [0, R_s]       stage s runs r requests on d
               load[m,d] in {0,1}                          m is activated on d this round
               keep[m,d] in {0,1}                          ACTIVE model m (idle or busy) survives the round on d
               T_d, Z, F_s >= 0                            device finish, round makespan, stage finish
    (1) sum_d r[s,d] = R_s                                 every request placed
    (2) mu x[s,d] <= r[s,d] <= R_s x[s,d]                  (shardable) / r[s,d] = R_s x[s,d] (otherwise)
    (3) sum_d x[s,d] <= K                                  (shardable) / sum_d x[s,d] = 1 (otherwise)
    (4) load[m(s),d] >= x[s,d]        when act[m(s),d] > 0: a load is paid once per (model, device)
    (5) mem_m load[m,d] + sum_m' mem_m' keep[m',d] <= memory_d   for each load: it fits beside what stays
    (6) c_d T_d >= c_d q_d + c_d sum_m act[m,d] load[m,d] + sum_s p[s,d] r[s,d]
    (7) Z >= T_d
    (8) c_d F_s >= c_d q_d + c_d sum_m act[m,d] load[m,d] + sum_{s' <=_d s} p[s',d] r[s',d] - c_d M (1 - x[s,d])
    (9) z[a,b,d] <= x[a,d], z[a,b,d] <= x[b,d]          for frontier pairs of one model sharing a prompt prefix
    M = max_d (q_d + sum_m act[m,d] + sum_s p[s,d] R_s) over the round's stages only: every stage of the round
        on d, alone, bounds every finish time, so (8) is void where x[s,d] = 0 (the rest of a frontier stays out)
    minimise  alpha Z + sum_s w_s F_s + sum_{s,d} o[s,d] x[s,d] + sum ev[m,d] (1 - keep[m,d]) - sum bonus z
Warm start: hints from the greedy assignment and from the previous round's values of variables that reappear
(stages re-planned after a failure). Limits: `time_limit_ms` wall and `deterministic_limit` (reproducible runs),
`num_workers`. OPTIMAL or FEASIBLE -> used; anything else -> the greedy assignment, counted as FALLBACK_<status>.
A round with one stage on one candidate, or only unsplittable single-candidate stages, skips the solver
(TRIVIAL); with `cpsat_rounds=contended`, so does a round whose greedy assignment has no two stages competing
(UNCONTENDED: none split, none sharing a device, each on its best-scored candidate). Frontiers larger than
`max_cpsat_stages`: CP-SAT on the highest-ranked stages, greedy for the rest (DECOMPOSED), so planning time stays
bounded.

Choices where the paper is silent: a stage's finish (8) counts the work queued ahead of it on its device in the
queue order (the backlog counted whole, the round's loads first), so old workflows' stages finish early and the
w_s-weighted sum serves P95 while the makespan term serves makespan; evictions follow LRU in the engine, the
model only decides which resident models a load may evict (5): loads on one device are sequential (each evicts
what it must once the stages before it ran) and a busy model is evictable once its shards end, so (5) never makes
a round infeasible, and the greedy assignment is always a feasible warm start; a `defer` option is not
implemented (every ready stage is placed).
"""

from __future__ import annotations

from collections.abc import Sequence

from fate_ray.events import StageKey
from fate_ray.policies.base import Assignment, Plan, Policy, PolicyContext, ReadyStage, rank_order
from fate_ray.policies.fate.config import FateConfig
from fate_ray.policies.fate.cpsat import PrefixPair, RoundModel
from fate_ray.policies.fate.greedy import Counts, RoundLedger, greedy_counts
from fate_ray.policies.fate.scoring import Candidate, Scorer
from fate_ray.policies.fate.validate import validate_plan
from fate_ray.state import ClusterSnapshot
from fate_ray.workload import TextPart

MIN_PAIR_TOKENS = 64  # shorter shared prefixes are not worth a pair variable


class FatePolicy(Policy):
    name = "fate"
    config = FateConfig()

    def __init__(self, ctx: PolicyContext, config: FateConfig | None = None):
        super().__init__(ctx)
        self.cfg = config or type(self).config
        if ctx.reproducible:  # only the deterministic limit binds; the wall-clock one stays as a stall guard
            self.cfg = self.cfg.model_copy(update={"time_limit_ms": max(self.cfg.time_limit_ms, 60_000.0)})
        self.own_prefetch = not self.cfg.prefetch  # prefetch off: replace the generic prefetch with none
        self.scorer = Scorer(self.cfg, self.cluster, self.estimator)
        self._previous: Counts = {}
        self._device_type = {d.device_id: d.type for d in self.cluster.devices}
        self.last_scores: dict[StageKey, list[Candidate]] = {}
        self.wall_limited_rounds = 0  # rounds CP-SAT ended on the wall-clock limit (planner-scale reports them)

    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        cands = self.scorer.score(snapshot, frontier)
        self.last_scores = cands
        counts, status = self._assign(snapshot, frontier, cands)
        self._previous = counts
        plan = Plan(self._split(snapshot, frontier, counts), status)
        validate_plan(plan, frontier, snapshot, self.cluster, self.cfg)
        return plan

    def candidate_terms(self, stage: StageKey) -> list[dict]:
        lam = self.cfg.lam
        out = []
        for c in self.last_scores.get(stage, ()):
            t = c.terms
            residency, locality, prefix, occupancy = (lam * (t.eviction_s + t.future_residency_s),
                                                      lam * t.future_locality_s, lam * t.future_prefix_s,
                                                      lam * t.future_occupancy_s)
            out.append({"device": c.device_id, "immediate": t.immediate_s, "residency": residency,
                        "locality": locality, "prefix": prefix, "occupancy": occupancy,
                        "future": residency + locality + prefix + occupancy, "reach": t.reach_s, "score": c.score_s,
                        "queue": t.queue_s, "activation": t.activation_s, "service": t.service_s})
        return out

    def _assign(self, snapshot, frontier, cands) -> tuple[Counts, str]:
        cfg = self.cfg
        if cfg.solver == "greedy":
            return greedy_counts(frontier, cands, cfg), "GREEDY"
        if all(len(cands[s.key]) == 1 or (len(s.request_indices) == 1 and len(frontier) == 1) for s in frontier):
            return greedy_counts(frontier, cands, cfg), "TRIVIAL"
        ranked = rank_order(frontier)
        head, tail = ranked[: cfg.max_cpsat_stages], ranked[cfg.max_cpsat_stages:]
        greedy_head = greedy_counts(head, cands, cfg)
        if cfg.cpsat_rounds == "contended" and not contended(head, cands, greedy_head):
            counts, status = greedy_head, "UNCONTENDED"
        else:
            model = RoundModel(head, cands, snapshot, self.cluster, cfg, self._pairs(head, cands),
                               self._evict_ms(snapshot, frontier))
            model.hint({**self._previous, **greedy_head})
            result = model.solve()
            self.wall_limited_rounds += result.wall_limited
            counts = result.counts if result.counts is not None else greedy_head
            status = result.status if result.counts is not None else f"FALLBACK_{result.status}"
        if tail:
            ledger = RoundLedger()
            for stage, stage_counts in counts.items():
                own = {c.device_id: c for c in cands[stage]}
                for d, n in stage_counts.items():
                    ledger.place(own[d], n)
            counts = {**counts, **greedy_counts(tail, cands, cfg, ledger)}
            status = "DECOMPOSED"
        return counts, status

    def _pairs(self, frontier: Sequence[ReadyStage], cands) -> list[PrefixPair]:
        if not self.cfg.prefix:
            return []
        leads: dict[tuple[str, int], list[ReadyStage]] = {}
        for s in frontier:
            first = s.dag.stages[s.key[1]].prompts[0][0] if s.dag and s.dag.stages[s.key[1]].prompts[0] else None
            if isinstance(first, TextPart) and first.tokens >= MIN_PAIR_TOKENS:
                leads.setdefault((s.model, first.key), []).append(s)
        pairs = []
        for (model, _), group in leads.items():
            for a, b in zip(group, group[1:]):
                tokens = a.dag.stages[a.key[1]].prompts[0][0].tokens
                rate = min(self.estimator.profile(model, self._device_type[c.device_id]).prefill_tok_s
                           for c in cands[a.key])
                saved_ms = int(1000 * tokens * min(len(a.request_indices), len(b.request_indices)) / rate)
                pairs.append(PrefixPair(a.key, b.key, saved_ms))
        return pairs

    def _evict_ms(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> dict[tuple[str, str], int]:
        """Reload cost of each idle ACTIVE model if evicted, when a frontier stage needs it and no other device
        has it ACTIVE."""
        if not self.cfg.residency:
            return {}
        needed = {s.model for s in frontier}
        out = {}
        for dev in snapshot.devices:
            for m, r in dev.residency.items():
                if r != "ACTIVE" or m not in needed:
                    continue
                if any(e is not dev and e.alive and e.state_of(m) == "ACTIVE" for e in snapshot.devices):
                    continue
                out[(m, dev.device.device_id)] = int(1000 * self.estimator.profile(m, dev.device.type).load_s)
        return out

    # -- which requests go where ------------------------------------------------------------------------------------
    def _split(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage], counts: Counts) -> tuple:
        by_id = {d.device.device_id: d for d in snapshot.devices}
        out: list[Assignment] = []
        for s in frontier:
            for d, idx in split_requests(s, counts[s.key], by_id, self.cluster.block_tokens).items():
                out.append(Assignment(s.key, d, idx))
        return tuple(out)


def contended(frontier: Sequence[ReadyStage], cands, counts: Counts) -> bool:
    """The greedy assignment has stages competing: one split over devices, two on one device, or one placed away
    from its best-scored candidate (the round's earlier placements made that one worse)."""
    used: set[str] = set()
    for s in frontier:
        placed = counts[s.key]
        if len(placed) > 1:
            return True
        device = next(iter(placed))
        if device in used or device != cands[s.key][0].device_id:
            return True
        used.add(device)
    return False


def split_requests(stage: ReadyStage, counts: dict[str, int], devices: dict, block_tokens: int) -> dict:
    """Give each device its count of the stage's requests, the ones it caches best first.

    Requests with the strongest preference (largest gap between their best and second-best device's cached
    tokens) choose first, so a child continuing a map's item i follows item i's context.
    """
    if len(counts) == 1:
        return {next(iter(counts)): stage.request_indices}
    hits = {i: {d: devices[d].cached_tokens(stage.model, req.block_hashes, block_tokens) for d in counts}
            for i, req in zip(stage.request_indices, stage.requests)}

    def preference(i: int) -> int:
        values = sorted(hits[i].values(), reverse=True)
        return values[1] - values[0]

    left = dict(counts)
    chosen: dict[str, list[int]] = {d: [] for d in counts}
    for i in sorted(stage.request_indices, key=preference):
        d = max((d for d in counts if left[d] > 0), key=lambda d: (hits[i][d], left[d]))
        chosen[d].append(i)
        left[d] -= 1
    return {d: tuple(sorted(idx)) for d, idx in chosen.items() if idx}


def make_policy_variant(name: str, **settings) -> type[FatePolicy]:
    """A registered FATE variant: the ablations are the same planner with one setting changed."""
    return type(f"Fate_{name.replace('-', '_')}", (FatePolicy,), {"name": name, "config": FateConfig(**settings)})


VARIANTS = {
    # No look-ahead at all: neither the rollout of the descendants nor the prefetch of their models (the one
    # look-ahead every policy gets from the Controller); `fate:horizon_hops=0` keeps the prefetch.
    "fate-h0": {"horizon_hops": 0, "prefetch": False},
    "fate-no-residency": {"residency": False},
    "fate-no-locality": {"locality": False},
    "fate-no-prefix": {"prefix": False},
    "fate-no-reach": {"reach": False},
    "fate-greedy": {"solver": "greedy"},
    "fate-no-prefetch": {"prefetch": False},
}

