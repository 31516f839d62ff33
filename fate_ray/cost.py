"""State-conditional cost estimation: how long a shard takes on a device, given what that device holds now.

    service(shard, d | state) = activation + transfer + prefill + decode
      activation: 0 if the model is ACTIVE on d, wake_s if SLEEPING, load_s if ABSENT
      transfer:   bytes of parent outputs held on other nodes / link bandwidth
      prefill:    (prompt tokens - tokens covered by d's cached prefix blocks) / prefill rate,
                  slowed by the shards already running on d (prefill is compute-bound, so they share it)
      decode:     sum over decode steps of step_ms(batch running at that step); a step costs nearly the same at
                  batch 1 and 32 (memory-bound, docs/calibration.md), so batching is almost free
    finish = max(now, free_at_d) + service

The same function is the simulator's "true" model (with true output lengths and lognormal noise on top), so the
planner's error comes from unknown output lengths, noise and contention, not from a different formula.
Requests of one shard run as one batch; blocks computed by an earlier request of the batch serve later ones, as
vLLM's prefix cache does within a batch.

Online calibration (`Calibration`) tracks, per (model, device type, phase), the median of measured/estimated (in log
space, bounded steps) and scales later estimates by it; `median_abs_log_error()` reports how far estimates were from what was measured.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fate_ray.schema.cluster import ClusterSpec, ModelProfile
from fate_ray.state import Activation, PrefixCache, Residency, activation_for, matched_blocks
from fate_ray.workload import RequestShape  # noqa: F401 -- the estimator's input, re-exported

PHASES = ("activation", "prefill", "decode")
TEXT_BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class ShardCost:
    activation: Activation
    activation_s: float
    transfer_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def service_s(self) -> float:
        return self.activation_s + self.transfer_s + self.prefill_s + self.decode_s


class DeviceView(Protocol):
    """What the estimator reads of a device: a DeviceSnapshot or a DeviceState both qualify."""

    caches: Mapping[str, PrefixCache]

    def state_of(self, model: str) -> Residency: ...


def activation_seconds(profile: ModelProfile, kind: Activation) -> float:
    """Uncalibrated time before a shard can run: 0 if resident, the wake time, or the cold load time."""
    return 0.0 if kind == "resident" else profile.wake_s if kind == "wake" else profile.load_s


def transfer_seconds(cluster: ClusterSpec, input_bytes_by_node: Mapping[str, int], node: str) -> float:
    """Time to pull the inputs held on other nodes to `node`, one link's bandwidth per source node."""
    return sum(b / (cluster.link_gbps(n, node) * 1e9) for n, b in input_bytes_by_node.items() if n != node)


def decode_seconds(profile: ModelProfile, output_tokens: Sequence[int], other_requests: int = 0) -> float:
    """Continuous batching: while k requests of the shard still decode, each step runs at batch k + others."""
    if len(output_tokens) > 1 and min(output_tokens) == max(output_tokens):
        # One length (a stage's expected one, as planners ask): the whole batch decodes together, the same sum as
        # the loop's. A fast path on the planner's hot path: a general pass over distinct lengths (Counter) gave
        # equal sums but cost ~2 us more per call.
        out = output_tokens[0]
        return out * profile.decode_step_ms(len(output_tokens) + other_requests) / 1000.0 if out > 0 else 0.0
    outs = sorted(output_tokens, reverse=True)
    total_ms = 0.0
    for i, out in enumerate(outs):
        nxt = outs[i + 1] if i + 1 < len(outs) else 0
        if out > nxt:
            total_ms += (out - nxt) * profile.decode_step_ms(i + 1 + other_requests)
    return total_ms / 1000.0


def cached_tokens_in_batch(cache: PrefixCache | None, requests: Sequence[RequestShape], block_tokens: int) -> int:
    """Tokens served from cache: blocks already on the device, or computed by an earlier request of the batch."""
    if cache is None and len(requests) < 2:
        return 0  # nothing on the device and no earlier request to share with (most estimates: one call each)
    return sum(cached_blocks_per_request(cache, [r.block_hashes for r in requests])) * block_tokens


def cached_blocks_per_request(cache: PrefixCache | None, chains: Sequence[Sequence[int]],
                              computing: set[int] | None = None) -> list[int]:
    """Per request of a batch, in order: full prompt blocks served from cache, that is already on the device, or
    computed by an earlier request of the batch or by `computing` (the chains of requests running now: vLLM caches
    a block as soon as it is computed).

    Both sets are prefix-closed, so a request's hit is the longer of its two leading matches (a prefix that
    alternates between them would match a little more; rare enough to ignore).
    """
    seen = computing if computing is not None else set()
    out = []
    for hashes in chains:
        on_device = cache.match_blocks(hashes) if cache is not None else 0
        out.append(max(on_device, matched_blocks(seen, hashes)) if seen else on_device)
        seen.update(hashes)
    return out


MAX_OBSERVATIONS = 200_000
_UNCALIBRATED = (1.0, 1.0, 1.0)


class Calibration:
    """Per (model, device type, phase) a bounded-step median tracker of measured / estimated, in log space; 1.0
    until something was measured."""

    def __init__(self, step: float = 0.05, enabled: bool = True):
        self.step = step
        self.enabled = enabled
        # Per (model, device type), the factors of the three PHASES in order: every estimate reads all three, and
        # one lookup is a third of three on the estimator's hottest path.
        self._factors: dict[tuple[str, str], tuple[float, float, float]] = {}
        # Per phase, bounded (a long-lived planner observes forever); far above one benchmark run's observations.
        self._log_errors: dict[str, deque[float]] = {}  # of the estimates used (calibrated)
        self._raw_log_errors: dict[str, deque[float]] = {}  # of the formula alone

    def factor(self, model: str, device_type: str, phase: str) -> float:
        return self.factors(model, device_type)[PHASES.index(phase)]

    def factors(self, model: str, device_type: str) -> tuple[float, float, float]:
        """The activation, prefill and decode factors (PHASES' order)."""
        return self._factors.get((model, device_type), _UNCALIBRATED) if self.enabled else _UNCALIBRATED

    def observe(self, model: str, device_type: str, phase: str, measured_s: float, estimated_s: float) -> None:
        """Record one measurement of a phase against the raw (uncalibrated) estimate of it."""
        if measured_s <= 0 or estimated_s <= 0:
            return
        factors = self._factors.get((model, device_type), _UNCALIBRATED)
        i = PHASES.index(phase)
        calibrated = estimated_s * self.factor(model, device_type, phase)  # what the planner actually used
        log_ratio = math.log(measured_s / estimated_s)
        if phase not in self._log_errors:
            self._log_errors[phase] = deque(maxlen=MAX_OBSERVATIONS)
            self._raw_log_errors[phase] = deque(maxlen=MAX_OBSERVATIONS)
        self._log_errors[phase].append(abs(math.log(measured_s / calibrated)))
        self._raw_log_errors[phase].append(abs(log_ratio))
        # A median tracker in log space: each observation moves the factor by at most `step` toward it. The
        # ratio is skewed (a shard is slowed by whatever else shares the device), and the median, not the mean,
        # is what minimises the typical |log error| we report.
        # It starts at 1 (trust the formula) rather than at the first ratio, which may be an outlier.
        log_old = math.log(factors[i])
        moved = math.exp(log_old + max(-self.step, min(self.step, log_ratio - log_old)))
        self._factors[(model, device_type)] = factors[:i] + (moved,) + factors[i + 1:]

    def median_abs_log_error(self, uncalibrated: bool = False, phase: str | None = None) -> float:
        """Median |log(measured / estimated)| over the observations (of one phase, or all); `uncalibrated`: of
        the raw formula."""
        by_phase = self._raw_log_errors if uncalibrated else self._log_errors
        errors = [e for p, errs in by_phase.items() if phase in (None, p) for e in errs]
        return statistics.median(errors) if errors else 0.0

    def report(self) -> dict[str, dict[str, float]]:
        """Per phase: observations, and the median |log error| of the formula alone and of the estimates used."""
        return {phase: {"observations": len(errs), "uncalibrated": round(self.median_abs_log_error(True, phase), 3),
                        "calibrated": round(self.median_abs_log_error(False, phase), 3)}
                for phase, errs in sorted(self._raw_log_errors.items())}


class CostEstimator:
    """Pure estimates of shard service time on a device in a given state."""

    def __init__(self, cluster: ClusterSpec, calibration: Calibration | None = None):
        self.cluster = cluster
        self.calibration = calibration or Calibration(enabled=False)
        self.block_tokens = cluster.block_tokens
        self._profiles: dict[tuple[str, str], ModelProfile] = {}

    def profile(self, model: str, device_type: str) -> ModelProfile:
        prof = self._profiles.get((model, device_type))
        if prof is None:
            prof = self._profiles[(model, device_type)] = self.cluster.models[model].profiles[device_type]
        return prof

    def observe_shard(self, model: str, device_type: str, prompt_tokens: int, cached_tokens: int,
                      output_tokens: Sequence[int], measured_s: Mapping[str, float]) -> None:
        """Feed a finished shard's measured phase times to calibration, against the raw estimates of those phases
        made with what it really did (its true output lengths and cache hits)."""
        prof = self.profile(model, device_type)
        raw = {"prefill": max(0, prompt_tokens - cached_tokens) / prof.prefill_tok_s,
               "decode": decode_seconds(prof, output_tokens)}
        for phase, measured in measured_s.items():
            if phase in raw:
                self.calibration.observe(model, device_type, phase, measured, raw[phase])

    def shard_cost(
        self,
        model: str,
        device_type: str,
        requests: Sequence[RequestShape],
        device: DeviceView | None,
        *,
        node: str = "",
        input_bytes_by_node: Mapping[str, int] | None = None,
        other_shards: int = 0,
        other_requests: int = 0,
    ) -> ShardCost:
        """Service time of `requests` of `model` on a device of `device_type`.

        `device=None` means "stateless": model resident, empty cache (what HEFT and the lower bound assume).
        `other_shards` / `other_requests` are what already runs on the device (contention).
        """
        prof = self.profile(model, device_type)
        state = device.state_of(model) if device is not None else "ACTIVE"
        activation = activation_for(state)
        activation_s = activation_seconds(prof, activation)
        cache = device.caches.get(model) if device is not None and state == "ACTIVE" else None
        prompt = sum(r.prompt_tokens for r in requests)
        cached = min(prompt, cached_tokens_in_batch(cache, requests, self.block_tokens)) if device else 0
        prefill_s = (prompt - cached) / prof.prefill_tok_s * (1 + other_shards)
        decode_s = decode_seconds(prof, [r.output_tokens for r in requests], other_requests)
        transfer_s = transfer_seconds(self.cluster, input_bytes_by_node, node) if input_bytes_by_node else 0.0
        activation_factor, prefill_factor, decode_factor = self.calibration.factors(model, device_type)
        return ShardCost(activation, activation_s * activation_factor, transfer_s, prefill_s * prefill_factor,
                         decode_s * decode_factor, prompt, cached)

    def activation_s(self, model: str, device_type: str, state: Residency) -> float:
        """Calibrated time to make `model`, now in `state`, ACTIVE on a device of `device_type`."""
        raw = activation_seconds(self.profile(model, device_type), activation_for(state))
        return raw * self.calibration.factor(model, device_type, "activation") if raw else 0.0

    def best_service_s(self, model: str, requests: Sequence[RequestShape]) -> float:
        """Fastest stateless service time over the device types that fit the model (for ranks and bounds)."""
        types = {d.type for d in self.cluster.devices_for(model)}
        return min(self.shard_cost(model, t, requests, None).service_s for t in types)
