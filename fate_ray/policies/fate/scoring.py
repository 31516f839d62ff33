"""Horizon-aware, state-conditional candidate scoring: `score(s, d) = immediate(s, d) + lam * future(s, d)`.

immediate = queue wait on d + activation of m(s) on d (0 / wake / load) + service (transfer + prefill with d's
            prefix hits + batched decode), i.e. the estimated finish time of s on d, relative to now.
future    = sum over horizon stages c of s (descendants within H hops, weight 1/hops) of
            [c's best estimated cost after placing s on d] - [c's best estimated cost without it],
            where placing s on d changes only d: d is busy for s's work; m(s) is ACTIVE there (and the models it
            evicts are not: their reload shows up); s's prompt + output blocks are in d's cache for m(s), so a
            child that continues s (locality) or shares s's leading prompt text (prefix) gets prefill hits on d.
            The best cost of c is min over devices of (wait once c is ready + activation + service).
            Plus the eviction term: reloading models that other frontier or horizon stages need, evicted by s.
reach     = a penalty for occupying d when d is one of the few devices that fit a model other pending stages
            need: occupancy of d by s x sum over such models of 1 / (devices that fit it).
Each state dimension is a separate term (`Terms`), so the ablations switch one off by a setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fate_ray.cost import CostEstimator, RequestShape, cached_tokens_in_batch, transfer_seconds
from fate_ray.events import StageKey
from fate_ray.policies.base import ReadyStage
from fate_ray.policies.fate.config import FateConfig
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot, DeviceSnapshot, Residency
from fate_ray.workload import ContextPart, TextPart


@dataclass(frozen=True, slots=True)
class Terms:
    """One candidate's score, term by term, in seconds (negative = a saving)."""

    queue_s: float
    activation_s: float
    service_s: float
    eviction_s: float
    future_locality_s: float
    future_prefix_s: float
    future_residency_s: float
    reach_s: float

    @property
    def immediate_s(self) -> float:
        return self.queue_s + self.activation_s + self.service_s

    @property
    def future_s(self) -> float:
        return self.eviction_s + self.future_locality_s + self.future_prefix_s + self.future_residency_s


@dataclass(frozen=True, slots=True)
class Candidate:
    stage: StageKey
    device_id: str
    model: str
    concurrency: int
    terms: Terms
    score_s: float  # immediate + lam * future + reach
    num_requests: int

    @property
    def offset_s(self) -> float:
        """What the score adds to the finish time: the look-ahead and reach terms, paid once per device used."""
        return self.score_s - self.terms.immediate_s

    @property
    def per_request_s(self) -> float:
        return self.terms.service_s / self.num_requests


@dataclass(frozen=True, slots=True)
class _Horizon:
    stage_id: str
    weight: float
    model: str
    num_requests: int
    context_tokens: int  # tokens of s's context it continues (0 if it does not continue s)
    shared_tokens: int  # leading prompt tokens it shares with s


class Scorer:
    def __init__(self, config: FateConfig, cluster: ClusterSpec, estimator: CostEstimator):
        self.cfg = config
        self.cluster = cluster
        self.estimator = estimator


    def score(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> dict[StageKey, list[Candidate]]:
        """Top-k candidates per stage, best first."""
        # Per-round memos: the snapshot and the calibration do not change within a round.
        self._stage_memo: dict[tuple, tuple[float, float, float, float]] = {}
        self._activation_memo: dict[tuple[str, str, Residency], float] = {}
        self._options_memo: dict[tuple[int, str], list[tuple[DeviceSnapshot, float, float, float]]] = {}
        live = [d for d in snapshot.devices if d.alive]
        horizons = {s.key: self._horizon(s) for s in frontier}
        # NOTE: sorted, not a set: float sums over it (reach) must not depend on the process's string hash seed.
        needed = sorted({s.model for s in frontier} | {h.model for hs in horizons.values() for h in hs})
        fit_count = {m: sum(self.cluster.fits(m, d.device.type) for d in live) for m in needed}
        out: dict[StageKey, list[Candidate]] = {}
        for s in frontier:
            devices = self._prefilter(s, [d for d in live if self.cluster.fits(s.model, d.device.type)], snapshot)
            cands = [self._candidate(s, d, snapshot, live, horizons[s.key], needed, fit_count) for d in devices]
            cands.sort(key=lambda c: (c.score_s, c.device_id))
            out[s.key] = cands[: self.cfg.top_k]
        return out

    def _prefilter(self, s: ReadyStage, devices: list[DeviceSnapshot], snapshot: ClusterSnapshot):
        """On large clusters, fully score only the devices a cheap bound (queue + activation + stateless service)
        ranks best, plus those holding the model (only they can have prefix hits)."""
        keep = 3 * self.cfg.top_k
        if len(devices) <= keep:
            return devices
        now = snapshot.now_s

        def bound(d: DeviceSnapshot) -> float:
            return max(0.0, d.free_at_s - now) + self._activation_s(s.model, d) + self._base(s, d.device.type)[0]

        ranked = sorted(devices, key=bound)
        resident = [d for d in ranked if d.state_of(s.model) == "ACTIVE"][: self.cfg.top_k]
        chosen = {id(d) for d in ranked[: 2 * self.cfg.top_k]} | {id(d) for d in resident}
        return [d for d in devices if id(d) in chosen]

    # -- one candidate ----------------------------------------------------------------------------------------------
    def _candidate(self, s: ReadyStage, d: DeviceSnapshot, snapshot: ClusterSnapshot, live, horizon,
                   needed: Sequence[str], fit_count: Mapping[str, int]) -> Candidate:
        cfg, now = self.cfg, snapshot.now_s
        dtype = d.device.type
        queue_s = max(0.0, d.free_at_s - now)
        service_s = self._service_s(s, d)
        activation_s = self._activation_s(s.model, d) if cfg.residency else 0.0
        eviction_s = 0.0
        evicts = d.plan_activation(s.model, self.cluster.models).evict if cfg.residency else ()
        if cfg.residency and cfg.horizon_hops > 0:
            for m in evicts:
                if m in needed and not any(e.state_of(m) == "ACTIVE" for e in live if e is not d):
                    eviction_s += self._activation_s(m, d, assume="ABSENT")
        occupy_s = (activation_s + service_s) / d.concurrency
        loc = pre = res = 0.0
        if cfg.horizon_hops > 0:
            finish_s = queue_s + activation_s + service_s
            for h in horizon:
                dl, dp, dr = self._future(s, d, h, live, now, finish_s, occupy_s, evicts)
                loc += h.weight * dl
                pre += h.weight * dp
                res += h.weight * dr
        reach_s = 0.0
        if cfg.reach and cfg.horizon_hops > 0:
            n_live = len(live)
            scarcity = sum(1.0 / fit_count[m] for m in needed
                           if m != s.model and fit_count.get(m, 0) and fit_count[m] < n_live
                           and self.cluster.fits(m, dtype))
            reach_s = cfg.reach_weight * occupy_s * scarcity
        terms = Terms(queue_s, activation_s, service_s, eviction_s, loc, pre, res, reach_s)
        score = terms.immediate_s + cfg.lam * terms.future_s + reach_s
        return Candidate(s.key, d.device.device_id, s.model, d.concurrency, terms, score, len(s.requests))

    def _service_s(self, s: ReadyStage, d: DeviceSnapshot) -> float:
        """Transfer + prefill (less d's prefix hits) + decode of the whole stage as one batch on d."""
        _, decode_s, prefill_s, per_token_s = self._base(s, d.device.type)
        if self.cfg.prefix and d.state_of(s.model) == "ACTIVE" and s.model in d.caches:
            prefill_s -= per_token_s * cached_tokens_in_batch(d.caches[s.model], s.requests, self.cluster.block_tokens)
        transfer_s = 0.0
        if self.cfg.locality and s.input_bytes_by_node:
            transfer_s = transfer_seconds(self.cluster, s.input_bytes_by_node, d.device.node)
        return transfer_s + max(0.0, prefill_s) + decode_s

    def _base(self, s: ReadyStage, device_type: str) -> tuple[float, float, float, float]:
        """Stateless (service, decode, prefill, prefill per token) of the stage on a device type, memoised."""
        key = (s.key, device_type)
        base = self._stage_memo.get(key)
        if base is None:
            cost = self.estimator.shard_cost(s.model, device_type, s.requests, None)
            base = self._stage_memo[key] = (cost.prefill_s + cost.decode_s, cost.decode_s, cost.prefill_s,
                                            cost.prefill_s / max(1, cost.prompt_tokens))
        return base

    def _activation_s(self, model: str, d: DeviceSnapshot, assume: Residency | None = None) -> float:
        key = (model, d.device.device_id, assume or d.state_of(model))
        value = self._activation_memo.get(key)
        if value is None:
            value = self._activation_memo[key] = self.estimator.activation_s(model, d.device.type, key[2])
        return value

    # -- look-ahead -------------------------------------------------------------------------------------------------
    def _horizon(self, s: ReadyStage) -> list[_Horizon]:
        dag: DagInfo | None = s.dag
        if dag is None or self.cfg.horizon_hops == 0:
            return []
        sid = s.key[1]
        me = dag.stages[sid]
        lead = me.prompts[0][0] if me.prompts and me.prompts[0] else None
        out: list[_Horizon] = []
        seen = {sid}
        layer = [sid]
        for hops in range(1, self.cfg.horizon_hops + 1):
            nxt = []
            for u in layer:
                for c in dag.children[u]:
                    if c not in seen:
                        seen.add(c)
                        nxt.append(c)
            for c in nxt:
                st = dag.stages[c]
                first = st.prompts[0][0] if st.prompts and st.prompts[0] else None
                context = 0
                if isinstance(first, ContextPart) and first.parent == sid:
                    context = dag.prompt_tokens[sid][first.item] + me.expected_output_tokens
                shared = 0
                if isinstance(lead, TextPart) and isinstance(first, TextPart) and first.key == lead.key:
                    shared = lead.tokens
                out.append(_Horizon(c, 1.0 / hops, st.model, st.num_requests, context, shared))
            layer = nxt
        out.sort(key=lambda h: -dag.ranks_s[h.stage_id])
        return out[: self.cfg.horizon_max_stages]

    def _child_service_s(self, dag: DagInfo, h: _Horizon, device_type: str) -> float:
        """Stateless service time of a horizon stage on a device type, memoised on its DAG."""
        key = ("fate.child_service_s", h.stage_id, device_type)
        value = dag.memo.get(key)
        if value is None:
            st = dag.stages[h.stage_id]
            reqs = [RequestShape(t, (), st.expected_output_tokens) for t in dag.prompt_tokens[h.stage_id]]
            cost = self.estimator.shard_cost(st.model, device_type, reqs, None)
            value = dag.memo[key] = cost.prefill_s + cost.decode_s
        return value

    def _options(self, dag: DagInfo, h: _Horizon, live) -> list[tuple[DeviceSnapshot, float, float, float]]:
        """Per round, the live devices that fit h's model, with (free at, activation, stateless service) there."""
        key = (id(dag), h.stage_id)
        options = self._options_memo.get(key)
        if options is None:
            options = self._options_memo[key] = [
                (e, e.free_at_s, self._activation_s(h.model, e), self._child_service_s(dag, h, e.device.type))
                for e in live if self.cluster.fits(h.model, e.device.type)]
        return options

    def _future(self, s: ReadyStage, d: DeviceSnapshot, h: _Horizon, live, now_s: float, ready_s: float,
                occupy_s: float, evicts: Sequence[str]) -> tuple[float, float, float]:
        """(locality, prefix, residency) parts of [best cost of h after s on d] - [best cost of h now];
        `evicts`: the models that making s's model ACTIVE on d evicts."""
        dag = s.dag
        before_d = None
        best_other = float("inf")
        for e, free_at_s, act_s, service_s in self._options(dag, h, live):
            cost = max(0.0, free_at_s - now_s - ready_s) + act_s + service_s
            if e is d:
                before_d = cost
            else:
                best_other = min(best_other, cost)
        if before_d is None:
            return 0.0, 0.0, 0.0  # h cannot run on d: placing s there changes nothing for h
        best_before = min(before_d, best_other)
        prof = self.estimator.profile(h.model, d.device.type)
        hit_rate = prof.prefill_tok_s / self.estimator.calibration.factor(h.model, d.device.type, "prefill")
        same_model = h.model == s.model
        # The three state changes on d, each credited to its own dimension.
        loc_gain = h.num_requests * h.context_tokens / hit_rate if same_model and self.cfg.locality else 0.0
        shared = 0
        if same_model and self.cfg.prefix:
            shared = max(0, h.shared_tokens - d.cached_tokens(h.model, s.requests[0].block_hashes,
                                                              self.cluster.block_tokens))
        pre_gain = h.num_requests * shared / hit_rate
        act_now = self._activation_s(h.model, d)
        act_after = act_now
        if self.cfg.residency:
            if same_model:
                act_after = 0.0
            elif h.model in evicts:
                act_after = self._activation_s(h.model, d, assume="ABSENT")
        busy_s = max(0.0, d.free_at_s - now_s + occupy_s - ready_s) - max(0.0, d.free_at_s - now_s - ready_s)
        after_d = before_d + busy_s + (act_after - act_now) - loc_gain - pre_gain
        total = min(after_d, best_other) - best_before
        if total == 0.0:
            return 0.0, 0.0, 0.0
        # Credit the change to the dimensions that pushed in its direction, in proportion to their raw effects.
        return _attribute(total, (-loc_gain, -pre_gain, act_after - act_now + busy_s))


def _attribute(total: float, parts: tuple[float, float, float]) -> tuple[float, float, float]:
    """Split `total` over the parts that push in its direction, in proportion to their size."""
    same_sign = [p if (p < 0) == (total < 0) else 0.0 for p in parts]
    scale = sum(same_sign)
    if scale == 0.0:
        return (0.0, 0.0, total)
    return tuple(total * p / scale for p in same_sign)  # type: ignore[return-value]
