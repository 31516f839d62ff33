"""Horizon-aware, state-conditional candidate scoring: `score(s, d) = immediate(s, d) + lam * future(s, d) + reach`.

immediate = queue wait on d + activation of m(s) on d (0 / wake / load) + service (transfer + prefill with d's
            prefix hits + batched decode), i.e. the estimated finish time of s on d, relative to now.
future    = what placing s on d costs s's descendants (within H hops) over the best candidate for s, measured by a
            greedy rollout of them from the state the placement induces (rollout.py): d busy for s's work, m(s)
            ACTIVE there and what it evicts gone, s's context and leading prompt text cached on d; each descendant
            placed where it would finish first in that state, in order, weighted by its critical-path rank. Split
            into residency (activations), locality (continued contexts), prefix (shared leading text) and
            occupancy (the descendants' ready, wait and service times). Plus the eviction term: reloading models
            that other frontier stages need, evicted by s.
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
from fate_ray.policies.fate.rollout import ZERO, HorizonStage, Rollout, RolloutCost, horizon
from fate_ray.progress import DagInfo
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.state import ClusterSnapshot, DeviceSnapshot, Residency


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
    future_occupancy_s: float = 0.0

    @property
    def immediate_s(self) -> float:
        return self.queue_s + self.activation_s + self.service_s

    @property
    def future_s(self) -> float:
        return (self.eviction_s + self.future_locality_s + self.future_prefix_s + self.future_residency_s
                + self.future_occupancy_s)


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


class Scorer:
    def __init__(self, config: FateConfig, cluster: ClusterSpec, estimator: CostEstimator):
        self.cfg = config
        self.cluster = cluster
        self.estimator = estimator
        # (model, device type) pairs that fit, looked up for every candidate and horizon option of every round
        self._fits = frozenset((m, t) for m in cluster.models for t in cluster.device_types if cluster.fits(m, t))

    def score(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> dict[StageKey, list[Candidate]]:
        """Top-k candidates per stage, best first."""
        # Per-round memos: the snapshot and the calibration do not change within a round.
        self._stage_memo: dict[tuple, tuple[float, float, float, float]] = {}
        self._activation_memo: dict[tuple[str, str, Residency], float] = {}
        self._options_memo: dict[tuple[int, str], list[tuple]] = {}
        self._model_options_memo: dict[str, list[tuple]] = {}
        self._evictions_memo: dict[tuple[str, int], tuple[tuple[str, ...], float]] = {}
        self._scarcity_memo: dict[tuple[str, str], float] = {}
        self._hit_memo: dict[tuple[str, str], float] = {}
        self._transfer_memo: dict[tuple[StageKey, str], float] = {}
        live = [d for d in snapshot.devices if d.alive]
        self.rollout = Rollout(self.cluster, live, snapshot.now_s)
        cfg = self.cfg
        horizons = {s.key: horizon(s, cfg, self.cluster) for s in frontier}
        # NOTE: sorted, not a set: float sums over it (reach) must not depend on the process's string hash seed.
        needed = sorted({s.model for s in frontier} | {h.model for hs in horizons.values() for h in hs})
        fit_count = {m: sum((m, d.device.type) in self._fits for d in live) for m in needed}
        out: dict[StageKey, list[Candidate]] = {}
        for s in frontier:
            devices = self._prefilter(s, [d for d in live if (s.model, d.device.type) in self._fits], snapshot)
            options = {h.stage_id: self._options(s.dag, h, live) for h in horizons[s.key]}
            raw = [(d, *self._terms(s, d, snapshot, live, horizons[s.key], options, needed, fit_count))
                   for d in devices]
            best = min((r for _, _, r in raw), key=lambda r: r.total_s, default=ZERO)
            cands = [self._candidate(s, d, parts, rollout, best) for d, parts, rollout in raw]
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
    def _terms(self, s: ReadyStage, d: DeviceSnapshot, snapshot: ClusterSnapshot, live, horizon_stages,
               options, needed: Sequence[str], fit_count: Mapping[str, int]) -> tuple[tuple, RolloutCost]:
        """The candidate's terms without its look-ahead, (queue, activation, service, eviction, reach) in seconds,
        and its raw rollout (compared with the stage's other candidates').

        NOTE: a plain tuple, not a `Terms` (and `_candidate` subtracts the best rollout field by field rather than
        through `RolloutCost.minus`): frozen dataclasses cost ~2 us each to build, ~0.3 s a chipseq run."""
        cfg, now = self.cfg, snapshot.now_s
        dtype = d.device.type
        queue_s = max(0.0, d.free_at_s - now)
        service_s = self._service_s(s, d)
        activation_s = self._activation_s(s.model, d) if cfg.residency else 0.0
        evicts, eviction_s = self._evictions(s.model, d, live, needed)
        occupy_s = (activation_s + service_s) / d.concurrency
        rollout = ZERO
        if cfg.horizon_hops > 0:
            rollout = self.rollout.cost(s, d, queue_s + activation_s + service_s, occupy_s, evicts, horizon_stages,
                                        options)
        reach_s = 0.0
        if cfg.reach and cfg.horizon_hops > 0:
            scarcity = self._scarcity_memo.get((s.model, dtype))
            if scarcity is None:
                n_live = len(live)
                scarcity = self._scarcity_memo[(s.model, dtype)] = sum(
                    1.0 / fit_count[m] for m in needed
                    if m != s.model and fit_count.get(m, 0) and fit_count[m] < n_live and (m, dtype) in self._fits)
            reach_s = cfg.reach_weight * occupy_s * scarcity
        return (queue_s, activation_s, service_s, eviction_s, reach_s), rollout

    def _evictions(self, model: str, d: DeviceSnapshot, live, needed: Sequence[str]) -> tuple[tuple[str, ...], float]:
        """The models activating `model` on d evicts, and the eviction term: reloading those other pending stages
        need that no other device has ACTIVE. Memoised per round: every frontier stage of the model reads the
        same."""
        key = (model, id(d))
        value = self._evictions_memo.get(key)
        if value is None:
            cfg = self.cfg
            eviction_s = 0.0
            evicts = d.plan_activation(model, self.cluster.models).evict if cfg.residency else ()
            if cfg.residency and cfg.horizon_hops > 0:
                for m in evicts:
                    if m in needed and not any(e.state_of(m) == "ACTIVE" for e in live if e is not d):
                        eviction_s += self._activation_s(m, d, assume="ABSENT")
            value = self._evictions_memo[key] = (evicts, eviction_s)
        return value

    def _candidate(self, s: ReadyStage, d: DeviceSnapshot, parts: tuple, rollout: RolloutCost,
                   best: RolloutCost) -> Candidate:
        """The candidate with its look-ahead: its rollout over the stage's best one, term by term (a dimension an
        ablation switches off is not in the rollout at all: no credit in `horizon`, no activation in `_options`)."""
        queue_s, activation_s, service_s, eviction_s, reach_s = parts
        terms = Terms(queue_s, activation_s, service_s, eviction_s, rollout.locality_s - best.locality_s,
                      rollout.prefix_s - best.prefix_s, rollout.residency_s - best.residency_s, reach_s,
                      rollout.occupancy_s - best.occupancy_s)
        score = terms.immediate_s + self.cfg.lam * terms.future_s + terms.reach_s
        return Candidate(s.key, d.device.device_id, s.model, d.concurrency, terms, score, len(s.requests))

    def _service_s(self, s: ReadyStage, d: DeviceSnapshot) -> float:
        """Transfer + prefill (less d's prefix hits) + decode of the whole stage as one batch on d."""
        _, decode_s, prefill_s, per_token_s = self._base(s, d.device.type)
        if self.cfg.prefix and d.state_of(s.model) == "ACTIVE" and s.model in d.caches:
            prefill_s -= per_token_s * cached_tokens_in_batch(d.caches[s.model], s.requests, self.cluster.block_tokens)
        transfer_s = 0.0
        if self.cfg.locality and s.input_bytes_by_node:
            transfer_s = self._transfer_s(s, d.device.node)
        return transfer_s + max(0.0, prefill_s) + decode_s

    def _transfer_s(self, s: ReadyStage, node: str) -> float:
        """Time to pull s's inputs to `node`, memoised per round (the devices of a node share it)."""
        key = (s.key, node)
        value = self._transfer_memo.get(key)
        if value is None:
            value = self._transfer_memo[key] = transfer_seconds(self.cluster, s.input_bytes_by_node, node)
        return value

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
        """Memoised per round by device type and state, all the estimate depends on (devices of a type share it)."""
        key = (model, d.device.type, assume or d.state_of(model))
        value = self._activation_memo.get(key)
        if value is None:
            value = self._activation_memo[key] = self.estimator.activation_s(*key)
        return value

    # -- look-ahead -------------------------------------------------------------------------------------------------
    def _child_service_s(self, dag: DagInfo, stage_id: str, device_type: str) -> float:
        """Stateless service time of a horizon stage on a device type, memoised on its DAG."""
        key = ("fate.child_service_s", stage_id, device_type)
        value = dag.memo.get(key)
        if value is None:
            st = dag.stages[stage_id]
            reqs = [RequestShape(t, (), st.expected_output_tokens) for t in dag.prompt_tokens[stage_id]]
            cost = self.estimator.shard_cost(st.model, device_type, reqs, None)
            value = dag.memo[key] = cost.prefill_s + cost.decode_s
        return value

    def _options(self, dag: DagInfo, h: HorizonStage, live) -> list[tuple]:
        """Per round, the live devices that fit h's model, as the rollout reads them: (id(device), device, concurrency,
        activation now, activation after an eviction, stateless service, prefill seconds saved per cached token)."""
        key = (id(dag), h.stage_id)
        options = self._options_memo.get(key)
        if options is None:
            options = self._options_memo[key] = []
            for key_e, e, conc, act_now, act_cold, hit in self._model_options(h.model, live):
                service = self._child_service_s(dag, h.stage_id, e.device.type)
                options.append((key_e, e, conc, act_now, act_cold, service, hit))
        return options

    def _model_options(self, model: str, live) -> list[tuple]:
        """Per round, the part of `_options` that depends on the model only (the horizon stages of one model
        share it): (id(device), device, concurrency, activation now, after an eviction, prefill s per cached
        token)."""
        options = self._model_options_memo.get(model)
        if options is None:
            residency = self.cfg.residency  # off (an ablation): activations cost nothing here, as in `immediate`
            options = self._model_options_memo[model] = [
                (id(e), e, e.concurrency, self._activation_s(model, e) if residency else 0.0,
                 self._activation_s(model, e, assume="ABSENT") if residency else 0.0,
                 self._hit_s_per_token(model, e.device.type))
                for e in live if (model, e.device.type) in self._fits]
        return options

    def _hit_s_per_token(self, model: str, device_type: str) -> float:
        value = self._hit_memo.get((model, device_type))
        if value is None:
            prof = self.estimator.profile(model, device_type)
            value = self._hit_memo[(model, device_type)] = (
                self.estimator.calibration.factor(model, device_type, "prefill") / prof.prefill_tok_s)
        return value
