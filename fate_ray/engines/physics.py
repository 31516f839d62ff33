"""The engine model's physical constants for one model on one device type, derived from the catalog's figures.

This is the simulator's truth, written apart from the planner's estimator (`fate_ray/cost.py`, never imported
here): both start from the same published figures (docs/calibration.md), but the engine model adds what the
closed-form estimate leaves out.

Decode step (memory-bound: every step reads the weights once and each running request's KV cache):
    step_ms(B, C) = b1_ms + beta_ms * (B - 1) + gamma_ms * (C - 1024)
  B running requests, C their total context tokens. `b1_ms` is the catalog's batch-1 step, measured at a context
  of 1024 tokens (Vidur's profiles, docs/calibration.md). gamma_ms = KV bytes per token / effective memory
  bandwidth, where the bandwidth is the one implied by the batch-1 step itself (weights bytes / b1_ms): for the
  8B on H100 that is 2.4 TB/s (datasheet: 3.35 TB/s), on L4 293 GB/s (datasheet: 300 GB/s). beta_ms is what is left
  of the catalog's batch-32 step once the KV reads of 32 x 1024 tokens are paid (>= 0): the per-sequence compute.
  So a long context costs more per step, which the estimator's context-free `decode_step_ms(batch)` ignores.
Prefill of a chunk of c tokens starting at position p (compute-bound, attention quadratic):
    prefill_s(c, p) = c / prefill_tok_s * (1 + (p + c / 2) / ATTENTION_KNEE_TOKENS)
  ATTENTION_KNEE_TOKENS = 34,000 fits Vidur's Llama-3-8B A100 prefill profile (512 / 2048 / 8192 tokens in
  41 / 189 / 801 ms: a per-token cost that rises 24% from 512 to 8192 tokens), applied to every model (EST).
KV memory: each ACTIVE model's engine owns `kv_reserve_gib` of the device (vLLM pre-allocates its KV pool at start,
  `gpu_memory_utilization`), i.e. kv_reserve_gib / kv_kib_per_token tokens in blocks of the cluster's block size.
  Running requests and cached prefix blocks share that pool.
Scheduling (vLLM V1 defaults): at most MAX_NUM_SEQS running requests, MAX_BATCHED_TOKENS tokens per step shared by
  decodes (one each) and prefill chunks (chunked prefill, FCFS).
Loads (catalog rule [L]: engine init + ~0.5 s per GiB of weights from storage): a cold load draws
  init_s x LogNormal(0.2) + weights_gib / STORAGE_GIB_S x LogNormal(0.3); a load of weights still in the node's page
  cache reads them at PAGE_CACHE_GIB_S (a 70B in ~10 s from a hot page cache, vLLM issue #19824). A wake from sleep
  draws wake_s x LogNormal(0.25) (blog.vllm.ai: 0.1-0.8 s small models, 3-6 s large).
Output lengths: expected x LogNormal with mean 1 and sigma OUTPUT_SIGMA = 0.65, fitted by moments to Mooncake's
  12,031 `output_length`s (mean 343, coefficient of variation 0.73; p50 / p90 / p99 = 350 / 597 / 1120). Parrot's
  57 MetaGPT calls have CV 0.39 (sigma 0.37); the larger trace sets the default. Clipped to [1, max_tokens].
Truth perturbation (`--truth-perturb F`): every constant above of every (model, device type) is scaled by its own
  seeded factor in [1 - F, 1 + F], so the benchmark shows how a policy degrades as the estimator's error grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from fate_ray.schema.cluster import ClusterSpec
from fate_ray.workload import stable_key

ATTENTION_KNEE_TOKENS = 34_000.0
B1_CONTEXT_TOKENS = 1024  # the context at which the catalog's decode figures were profiled
MAX_NUM_SEQS = 256
MAX_BATCHED_TOKENS = 2048
STORAGE_GIB_S = 2.0  # catalog rule [L]: ~0.5 s per GiB of weights from NVMe
PAGE_CACHE_GIB_S = 13.0  # ~140 GB in ~10 s from a hot page cache
OUTPUT_SIGMA = 0.65
INIT_SIGMA, WEIGHTS_SIGMA, WAKE_SIGMA = 0.2, 0.3, 0.25
MIN_LOAD_FACTOR = 0.5  # load and wake draws never go below half their figure: the lower bound relies on it
_NORMAL = NormalDist()


def seeded_normal(*key: object) -> float:
    """A standard normal draw determined by `key` (so it does not depend on event order)."""
    u = ((stable_key(*key) & ((1 << 53) - 1)) + 0.5) / (1 << 53)
    return _NORMAL.inv_cdf(u)


def lognormal_factor(sigma: float, *key: object) -> float:
    """A mean-one lognormal draw: E[exp(s z - s^2 / 2)] = 1."""
    return math.exp(sigma * seeded_normal(*key) - sigma * sigma / 2) if sigma > 0 else 1.0


@dataclass(frozen=True, slots=True)
class EnginePhysics:
    """Constants of one model's engine on one device type (times in ms or s as named)."""

    b1_ms: float
    beta_ms: float  # per extra running sequence
    gamma_ms: float  # per context token read by a decode step
    prefill_tok_s: float
    kv_capacity_blocks: int
    init_s: float  # engine start-up part of a cold load
    weights_gib: float
    wake_s: float

    def decode_step_ms(self, batch: int, context_tokens: float) -> float:
        step = self.b1_ms + self.beta_ms * (batch - 1) + self.gamma_ms * (context_tokens - B1_CONTEXT_TOKENS)
        return max(0.5 * self.b1_ms, step)

    def prefill_s(self, tokens: float, start_position: float) -> float:
        return tokens / self.prefill_tok_s * (1 + (start_position + tokens / 2) / ATTENTION_KNEE_TOKENS)


def derive_physics(cluster: ClusterSpec, model: str, device_type: str, perturb: float = 0.0,
                   seed: int = 0) -> EnginePhysics:
    """The constants of `model` on `device_type`, each scaled by a seeded factor in [1 - perturb, 1 + perturb]."""
    spec = cluster.models[model]
    prof = spec.profiles[device_type]

    def scale(name: str) -> float:
        if perturb <= 0:
            return 1.0
        u = (stable_key(seed, "perturb", model, device_type, name) % 1_000_003) / 1_000_002
        return 1 - perturb + 2 * perturb * u

    kv_bytes = spec.kv_kib_per_token * 1024
    bandwidth_b_per_ms = spec.weights_gib * 2**30 / prof.decode_step_ms_b1
    gamma = kv_bytes / bandwidth_b_per_ms
    beta = max(0.0, (prof.decode_step_ms_b32 - prof.decode_step_ms_b1 - gamma * 31 * B1_CONTEXT_TOKENS) / 31)
    tokens = spec.kv_reserve_gib * 2**20 / spec.kv_kib_per_token
    init_s = max(0.4 * prof.load_s, prof.load_s - spec.weights_gib / STORAGE_GIB_S)
    return EnginePhysics(
        b1_ms=prof.decode_step_ms_b1 * scale("b1"), beta_ms=beta * scale("beta"), gamma_ms=gamma * scale("gamma"),
        prefill_tok_s=prof.prefill_tok_s * scale("prefill"),
        kv_capacity_blocks=max(1, int(tokens * scale("kv") // cluster.block_tokens)),
        init_s=init_s * scale("init"), weights_gib=spec.weights_gib, wake_s=prof.wake_s * scale("wake"))


@dataclass(frozen=True, slots=True)
class Draws:
    """Every random draw of the engine model, a pure function of (seed, what runs), not of event order, so all
    policies meet the same output lengths for the same requests."""

    seed: int = 0
    output_sigma: float = OUTPUT_SIGMA
    load_noise: bool = True

    def output_tokens(self, workflow_id: str, stage_id: str, index: int, expected: int, max_tokens: int) -> int:
        value = expected * lognormal_factor(self.output_sigma, self.seed, "out", workflow_id, stage_id, index)
        return max(1, min(max_tokens, round(value)))

    def _factor(self, sigma: float, *key: object) -> float:
        return max(MIN_LOAD_FACTOR, lognormal_factor(sigma, self.seed, *key)) if self.load_noise else 1.0

    def load_s(self, phys: EnginePhysics, warm_page_cache: bool, *key: object) -> float:
        rate = PAGE_CACHE_GIB_S if warm_page_cache else STORAGE_GIB_S
        return (phys.init_s * self._factor(INIT_SIGMA, "init", *key)
                + phys.weights_gib / rate * self._factor(WEIGHTS_SIGMA, "read", *key))

    def wake_s(self, phys: EnginePhysics, *key: object) -> float:
        return phys.wake_s * self._factor(WAKE_SIGMA, "wake", *key)

    def min_load_s(self, phys: EnginePhysics) -> float:
        """The shortest load any draw can give (weights from the page cache)."""
        low = MIN_LOAD_FACTOR if self.load_noise else 1.0
        return low * (phys.init_s + phys.weights_gib / PAGE_CACHE_GIB_S)
