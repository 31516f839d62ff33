"""The modelled hardware: what one device holds, and how long a shard really takes on it.

An engine on modelled hardware: the simulator runs one `ModelledDevice` per device (sim/truth.py), and the Ray
runtime's `SimEngine` runs one for its own device, so both execute shards with the same model of the hardware.

True service time = the estimator's formula (cost.py) evaluated on the device's *true* state with the requests'
*true* output lengths, times seeded lognormal noise (sigma 0.15 by default) on each phase. The planner sees only
expected output lengths; true lengths are lognormal around them (sigma 0.5), clipped to [1, max_tokens].

Every random draw is a pure function of (seed, what runs), not of the order in which a policy runs things, so all
policies meet the same output lengths and the same noise for the same work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from fate_ray.cost import CostEstimator, activation_seconds
from fate_ray.events import Dispatch, LoadModel, Shard
from fate_ray.schema.cluster import ClusterSpec, Device
from fate_ray.state import Activation, DeviceState, block_hashes
from fate_ray.workload import Segment, output_key, stable_key

_NORMAL = NormalDist()


def seeded_normal(*key: object) -> float:
    """A standard normal draw determined by `key` (so it does not depend on event order)."""
    u = ((stable_key(*key) & ((1 << 53) - 1)) + 0.5) / (1 << 53)
    return _NORMAL.inv_cdf(u)


@dataclass(frozen=True, slots=True)
class NoiseModel:
    seed: int = 0
    phase_sigma: float = 0.15
    output_sigma: float = 0.5

    def output_tokens(self, workflow_id: str, stage_id: str, index: int, expected: int, max_tokens: int) -> int:
        if self.output_sigma <= 0:
            return min(expected, max_tokens)
        # Mean-preserving lognormal: E[exp(s z - s^2/2)] = 1.
        z = seeded_normal(self.seed, "out", workflow_id, stage_id, index)
        value = expected * math.exp(self.output_sigma * z - self.output_sigma**2 / 2)
        return max(1, min(max_tokens, round(value)))

    def factor(self, *key: object) -> float:
        if self.phase_sigma <= 0:
            return 1.0
        return math.exp(self.phase_sigma * seeded_normal(self.seed, "noise", *key) - self.phase_sigma**2 / 2)


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    start_s: float
    end_s: float
    activation: Activation
    activation_s: float  # time spent waiting for the model (its load, or another shard's load in progress)
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: tuple[int, ...]


class ModelledDevice:
    """One device's ground truth: what it holds, and how long a shard really takes on it.

    Used by the simulator for every device, and by the Ray runtime's SimEngine for its own device, so both
    execute shards with the same model of the hardware."""

    def __init__(self, cluster: ClusterSpec, device: Device, noise: NoiseModel):
        self.cluster = cluster
        self.noise = noise
        self.estimator = CostEstimator(cluster)  # uncalibrated: the formula itself
        self.state = DeviceState.empty(cluster, device)
        self.ready_at_s: dict[str, float] = {}  # model -> when its load/wake completes
        self.running: dict[str, int] = {}  # shard id -> requests
        self.alive = True

    def start(self, cmd: Dispatch, now_s: float) -> ShardOutcome:
        shard = cmd.shard
        outs = tuple(self.noise.output_tokens(shard.workflow_id, shard.stage_id, i, shard.expected_output_tokens,
                                              shard.max_tokens) for i in shard.request_indices)
        reqs = shard.request_shapes(outs)
        cost = self.estimator.shard_cost(shard.model, self.state.device.type, reqs, self.state,
                                         other_shards=len(self.running), other_requests=sum(self.running.values()))
        noise_key = (shard.workflow_id, shard.stage_id, shard.request_indices[0], cmd.device_id, shard.attempt)
        kind = self.state.activate(shard.model, now_s, cmd.evict)
        if kind != "resident":
            self.ready_at_s[shard.model] = now_s + cost.activation_s * self.noise.factor("act", *noise_key)
        activation_s = max(0.0, self.ready_at_s.get(shard.model, now_s) - now_s)
        prefill_s = cost.prefill_s * self.noise.factor("prefill", *noise_key)
        decode_s = cost.decode_s * self.noise.factor("decode", *noise_key)
        self.state.shard_started(shard.model)
        self.running[shard.shard_id] = len(reqs)
        end_s = now_s + activation_s + cost.transfer_s + prefill_s + decode_s
        return ShardOutcome(now_s, end_s, kind, activation_s, prefill_s, decode_s, cost.prompt_tokens,
                            cost.cached_tokens, outs)

    def load(self, cmd: LoadModel, now_s: float) -> Activation:
        """A prefetch: the model becomes ACTIVE now and usable once its load or wake completes."""
        kind = self.state.activate(cmd.model, now_s, cmd.evict)
        if kind != "resident":
            seconds = activation_seconds(self.estimator.profile(cmd.model, self.state.device.type), kind)
            self.ready_at_s[cmd.model] = now_s + seconds * self.noise.factor("prefetch", cmd.model, cmd.device_id,
                                                                              now_s)
        return kind

    def finish(self, shard: Shard, outcome: ShardOutcome) -> None:
        self.running.pop(shard.shard_id)
        self.state.shard_ended(shard.model, outcome.end_s)
        for prompt, index, out in zip(shard.prompts, shard.request_indices, outcome.output_tokens):
            segments = prompt + (Segment(output_key(shard.workflow_id, shard.stage_id, index), out),)
            self.state.insert_blocks(shard.model, block_hashes(segments, self.cluster.block_tokens))

    def kill(self) -> None:
        self.alive = False
        self.running.clear()
