"""The CP-SAT model of one planning round. The formulation is written once, in policies/fate/planner.py's
docstring; the numbered blocks below follow it. Times are integer milliseconds relative to now."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ortools.sat.python import cp_model

from fate_ray.events import StageKey
from fate_ray.policies.base import ReadyStage
from fate_ray.policies.fate.config import FateConfig
from fate_ray.policies.fate.greedy import Counts
from fate_ray.policies.fate.scoring import Candidate
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot

MIB_PER_GIB = 1024
LinearExpr = cp_model.LinearExpr


@dataclass(frozen=True)
class PrefixPair:
    """Two frontier stages of one model that share `bonus_ms` of prefill if co-located."""

    a: StageKey
    b: StageKey
    bonus_ms: int


@dataclass(frozen=True)
class SolveResult:
    counts: Counts | None  # None unless the status is OPTIMAL or FEASIBLE
    status: str
    # Stopped by the wall-clock limit before the deterministic one: the answer then depends on the machine's speed.
    wall_limited: bool = False


# NOTE on building expressions: a Python `sum()` of k terms builds an expression object per term and per partial
# sum, each flattened again by every constraint it reaches (the running sums of (8)); `LinearExpr.weighted_sum(vars,
# coeffs) + constant` is one object. Both flatten to the same constraint (variables in the order written, zero
# coefficients dropped, the constant in the bounds): the model handed to the solver is the same, byte for byte
# (checked on every model of a chipseq run), and building it takes about a tenth less.


class _CpModel(cp_model.CpModel):
    """A CpModel without its pre-PEP8 aliases. OR-Tools' constructor adds a camelCase alias of every add_/new_
    method to each model it builds (dir() plus ~100 setattr calls, about 1.3 ms, a quarter of building a round's
    model); this module calls only the snake_case names."""

    def _add_pre_pep8_methods(self) -> None:
        pass


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))


class RoundModel:
    """Variables and constraints of one round (cpsat-primer style: one method per constraint block)."""

    def __init__(self, frontier: Sequence[ReadyStage], candidates: Mapping[StageKey, list[Candidate]],
                 snapshot: ClusterSnapshot, cluster: ClusterSpec, cfg: FateConfig, pairs: Sequence[PrefixPair],
                 evict_ms: Mapping[tuple[str, str], int]):
        self.frontier, self.cands, self.snapshot, self.cluster, self.cfg = frontier, candidates, snapshot, cluster, cfg
        self.pairs, self.evict_ms = pairs, evict_ms
        self.m = _CpModel()
        self.x: dict[tuple[StageKey, str], cp_model.IntVar] = {}
        self.r: dict[tuple[StageKey, str], cp_model.IntVar] = {}
        self.load: dict[tuple[str, str], cp_model.IntVar] = {}
        self.keep: dict[tuple[str, str], cp_model.IntVar] = {}
        self.finish_d: dict[str, cp_model.IntVar] = {}
        self.finish_s: dict[StageKey, cp_model.IntVar] = {}
        self.objective_terms: list = []
        self.by_device: dict[str, list[Candidate]] = {}  # this round's candidates, per device
        # Work per request of each candidate, in the rounded milliseconds every block reads (big-M included)
        self.per_request_ms: dict[tuple[StageKey, str], int] = {}
        for s in frontier:
            for c in candidates[s.key]:
                self.by_device.setdefault(c.device_id, []).append(c)
                self.per_request_ms[(s.key, c.device_id)] = _ms(c.per_request_s)
        self.big_m_ms = self._big_m_ms()
        self._add_assignment()      # (1)-(3)
        self._add_shared_loads()    # (4)
        self._add_memory()          # (5)
        self._add_finish_times()    # (6)-(8)
        self._add_prefix_pairs()    # (9)
        self._add_objective()

    def _big_m_ms(self) -> int:
        """An upper bound on any finish time this round (big-M), from the same rounded milliseconds the
        constraints use: the device whose backlog, loads and work would be longest if every stage of the round ran
        there, alone (slots only shorten it). Only this round's stages count, not the rest of a large frontier: a
        looser M weakens the LP relaxation."""
        worst_ms = 0
        for cands in self.by_device.values():
            load_ms: dict[str, int] = {}
            for c in cands:
                load_ms[c.model] = max(load_ms.get(c.model, 0), _ms(c.terms.activation_s))
            work_ms = sum(self.per_request_ms[(c.stage, c.device_id)] * c.num_requests for c in cands)
            worst_ms = max(worst_ms, _ms(cands[0].terms.queue_s) + sum(load_ms.values()) + work_ms)
        return worst_ms + 1

    def _add_assignment(self) -> None:
        m, cfg = self.m, self.cfg
        for s in self.frontier:
            total = len(s.request_indices)
            shardable = s.shardable and total >= 2 * cfg.min_shard and cfg.max_shards > 1
            xs = []
            for c in self.cands[s.key]:
                key = (s.key, c.device_id)
                x = self.x[key] = m.new_bool_var(f"x[{s.key},{c.device_id}]")
                r = self.r[key] = m.new_int_var(0, total, f"r[{s.key},{c.device_id}]")
                if shardable:
                    m.add(r <= total * x)                                   # (2) no requests without x
                    m.add(r >= min(cfg.min_shard, total) * x)               # (2) shards are not tiny
                else:
                    m.add(r == total * x)
                xs.append(x)
            m.add(LinearExpr.sum([self.r[(s.key, c.device_id)] for c in self.cands[s.key]]) == total)  # (1)
            if shardable:
                m.add(LinearExpr.sum(xs) <= cfg.max_shards)                             # (3) bounded shards
            else:
                m.add_exactly_one(xs)

    def _add_shared_loads(self) -> None:
        for s in self.frontier:
            for c in self.cands[s.key]:
                if c.terms.activation_s > 0:
                    key = (c.model, c.device_id)
                    if key not in self.load:
                        self.load[key] = self.m.new_bool_var(f"load[{key}]")
                    self.m.add_implication(self.x[(s.key, c.device_id)], self.load[key])     # (4) paid once

    def _add_memory(self) -> None:
        """(5) Each load this round must fit beside the resident models that survive it (`keep`). A device runs its
        queue in order, so two loads on it need not fit together (the second evicts the first after its stages
        ran), and a model busy now is evictable once its shards end: every ACTIVE model gets a `keep`, and a load
        that fits the device alone is always possible. The model is therefore feasible for any assignment, the
        greedy one included."""
        models = self.cluster.models
        for dev in self.snapshot.devices:
            d = dev.device.device_id
            loads = [(m, v) for (m, dd), v in self.load.items() if dd == d]
            if not loads:
                continue
            resident = sorted(m for m, r in dev.residency.items() if r == "ACTIVE")
            for m in resident:
                self.keep[(m, d)] = self.m.new_bool_var(f"keep[{m},{d}]")
            capacity = int(dev.memory_gib * MIB_PER_GIB)
            kept = sum(int(models[m].footprint_gib * MIB_PER_GIB) * self.keep[(m, d)] for m in resident)
            for m, load in loads:
                self.m.add(int(models[m].footprint_gib * MIB_PER_GIB) * load + kept <= capacity)      # (5)

    def _add_finish_times(self) -> None:
        m, big = self.m, self.big_m_ms
        makespan = self.makespan = m.new_int_var(0, big, "makespan")
        # Per device, x its concurrency: the backlog (a constant) and the round's loads there (terms), then, in (8),
        # the work of the stages placed ahead so far. Terms as parallel lists of variables and coefficients.
        fixed_ms: dict[str, int] = {}
        ahead_vars: dict[str, list] = {}
        ahead_coeffs: dict[str, list[int]] = {}
        for d, cands in self.by_device.items():
            conc = cands[0].concurrency
            fixed_ms[d] = conc * _ms(cands[0].terms.queue_s)
            t = self.finish_d[d] = m.new_int_var(0, big, f"T[{d}]")
            load_ms: dict[str, int] = {}  # per model loaded here, from its first candidate on d
            for c in cands:
                if (c.model, d) in self.load and c.model not in load_ms:
                    load_ms[c.model] = _ms(c.terms.activation_s)
            ahead_vars[d] = [self.load[(model, d)] for model in load_ms]
            ahead_coeffs[d] = [conc * ms for ms in load_ms.values()]
            work_vars = [self.r[(c.stage, d)] for c in cands]
            work_coeffs = [self.per_request_ms[(c.stage, d)] for c in cands]
            m.add(conc * t >= LinearExpr.weighted_sum(ahead_vars[d] + work_vars, ahead_coeffs[d] + work_coeffs)
                  + fixed_ms[d])                                                            # (6) device finish
            m.add(makespan >= t)                                                            # (7) makespan
        # (8) A stage finishes once the work queued before it on its device is done: the backlog, the round's loads
        # there, and the round's stages ahead of it in the device's queue order (oldest workflow first, then
        # upward rank: the Controller's default), itself included, over the device's slots. The big-M term
        # `- conc big (1 - x)` is written as `+ conc big x - conc big`.
        for s in sorted(self.frontier, key=lambda s: (s.arrival_s, -s.rank_s, s.key)):
            f = self.finish_s[s.key] = m.new_int_var(0, big, f"F[{s.key}]")
            for c in self.cands[s.key]:
                d, conc = c.device_id, c.concurrency
                ahead_vars[d].append(self.r[(s.key, d)])
                ahead_coeffs[d].append(self.per_request_ms[(s.key, d)])
                released = LinearExpr.weighted_sum(ahead_vars[d] + [self.x[(s.key, d)]], ahead_coeffs[d] + [conc * big])
                m.add(conc * f >= released + (fixed_ms[d] - conc * big))                   # (8)

    def _add_prefix_pairs(self) -> None:
        self.z = []
        for p in self.pairs:
            in_b = {c.device_id for c in self.cands[p.b]}
            # NOTE: in candidate order, not set order: variable order must not depend on the string hash seed.
            for d in [c.device_id for c in self.cands[p.a] if c.device_id in in_b]:
                z = self.m.new_bool_var(f"z[{p.a},{p.b},{d}]")
                self.m.add_implication(z, self.x[(p.a, d)])                                    # (9)
                self.m.add_implication(z, self.x[(p.b, d)])
                self.z.append((z, p.bonus_ms))

    def _add_objective(self) -> None:
        cfg = self.cfg
        now = self.snapshot.now_s
        max_rank = max((s.rank_s for s in self.frontier), default=0.0) or 1.0
        max_age = max((now - s.arrival_s for s in self.frontier), default=0.0) or 1.0
        variables, coeffs = [self.makespan], [int(round(cfg.alpha * 100))]
        for s in self.frontier:
            # Critical-path stages weigh up to 2x (makespan), the oldest workflow's up to 2x more (its latency: P95).
            age = max(0.0, now - s.arrival_s)
            variables.append(self.finish_s[s.key])
            coeffs.append(100 + int(round(100 * s.rank_s / max_rank)) + int(round(100 * age / max_age)))
            for c in self.cands[s.key]:
                offset_s = c.offset_s - cfg.lam * c.terms.eviction_s  # evictions are explicit (keep) here
                variables.append(self.x[(s.key, c.device_id)])
                coeffs.append(100 * int(round(offset_s * 1000)))
        evicted_ms = 0  # sum ev (1 - keep) = sum ev - sum ev keep
        for (m, d), keep in self.keep.items():
            ev = 100 * int(cfg.lam * self.evict_ms.get((m, d), 0))
            variables.append(keep)
            coeffs.append(-ev)
            evicted_ms += ev
        for z, bonus in self.z:
            variables.append(z)
            coeffs.append(-100 * bonus)
        self.m.minimize(LinearExpr.weighted_sum(variables, coeffs) + evicted_ms)

    # -- solving ----------------------------------------------------------------------------------------------------
    def hint(self, counts: Counts) -> None:
        # NOTE: the hint's repeated fields extended once, not an add_hint call (and two appends) per variable: the
        # same (r, x) pairs in the same order, in a fifth of the time (0.34 -> 0.06 s on chipseq).
        variables, values = [], []
        for (stage, d), r in self.r.items():
            n = counts.get(stage, {}).get(d, 0)
            variables += (r.index, self.x[(stage, d)].index)
            values += (n, 1 if n else 0)
        self.m.model_proto.solution_hint.vars.extend(variables)
        self.m.model_proto.solution_hint.values.extend(values)

    def solve(self) -> SolveResult:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.cfg.time_limit_ms / 1000
        solver.parameters.max_deterministic_time = self.cfg.deterministic_limit
        solver.parameters.num_workers = self.cfg.num_workers
        # NOTE: OR-Tools' defaults. Without the LP relaxation, probing and symmetry detection a solve took half the
        # time on recorded real-DAG rounds, as many proven OPTIMAL, but the rounds that hit the deterministic limit
        # came out worse more often than better, and on the real-DAG suite FATE's P95 moved by 1.032 [0.997, 1.069]
        # (makespan 1.002 [1.000, 1.005]): not worth 9% of FATE's simulation time.
        status = solver.solve(self.m)
        name = solver.status_name(status)
        wall_limited = (status != cp_model.OPTIMAL and solver.wall_time >= self.cfg.time_limit_ms / 1000
                        and solver.response_proto.deterministic_time < self.cfg.deterministic_limit)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return SolveResult(None, name, wall_limited)
        counts: Counts = {}
        for (stage, d), r in self.r.items():
            n = solver.value(r)
            if n:
                counts.setdefault(stage, {})[d] = n
        return SolveResult(counts, name, wall_limited)
