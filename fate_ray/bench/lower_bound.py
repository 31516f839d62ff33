"""Lower bounds on one run's makespan and P95 latency: the run's own draws, the engine model's best case.

    makespan LB = max(work bound, path bound) - first arrival
    P95 LB      = the 95th percentile (linear interpolation) of the workflows' own path bounds from their arrivals

Best case, each assumption at least as fast as anything the engine model (fate_ray/engines/) can do:
- output lengths are the run's own draws (physics.Draws with the run's seed: the same for every policy);
- every prompt token that could come from a cache does: a parent's output or context is never prefilled again,
  and each distinct fixed text (a `TextPart` key) is prefilled once in the whole run, at the device type's raw
  prefill rate with no attention cost;
- a decode token costs the least any batch size up to MAX_NUM_SEQS can give per token, with no context read
  (physics.EnginePhysics.decode_step_ms with the context term at its floor), on the fastest device type;
- a model no device holds at the start cannot serve before the shortest load the engine can draw has passed since
  the first arrival of a workflow that uses it.
work bound = first arrival + max(decode of every request, prefill of every distinct text) / number of devices
             (a mixed step lasts as long as the slower of its prefill chunk and its decodes, so a device's busy
             time is at least each of its two sums, not their total)
path bound = max over workflows of the critical path from its arrival: each stage lasts at least its longest
             request's decode (its tokens after the first x the shortest step) and starts after its parents and
             its model's load.
The P95 bound holds because each workflow's latency is at least its own path bound, and an order statistic of
values that are each at least their bound is at least the same order statistic of the bounds (taken over the
workflows that completed, as the run's P95 is). It leaves out queueing behind other workflows, prefill and loads
beyond the first, so it is loose under load: it limits how much any policy can improve on another (9% better
needs that one's P95 above 1.09 x the bound), it does not show that the rest of the gap can be closed.
`tests/test_bench_lower_bound.py` checks both bounds for every policy on the examples and a real-dag sample.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fate_ray.engines.physics import MAX_NUM_SEQS, Draws, EnginePhysics, derive_physics
from fate_ray.schema.cluster import ClusterSpec
from fate_ray.sim.simulator import SimConfig, percentile
from fate_ray.workload import TextPart, Workflow


class _Best:
    """Per model, the best figures over the device types that fit it."""

    def __init__(self, cluster: ClusterSpec, perturb: float, draws: Draws):
        self.cluster, self.perturb, self.draws = cluster, perturb, draws
        self._memo: dict[str, tuple[float, float, float, float]] = {}

    def figures(self, model: str) -> tuple[float, float, float, float]:
        """(decode s per token in a batch, shortest decode step s, prefill s per token, shortest load s)."""
        out = self._memo.get(model)
        if out is None:
            types = {d.type for d in self.cluster.devices_for(model)}
            phys = [derive_physics(self.cluster, model, t, self.perturb, self.draws.seed) for t in types]
            out = self._memo[model] = (min(_per_token_s(p) for p in phys), min(_min_step_s(p) for p in phys),
                                       min(1 / p.prefill_tok_s for p in phys),
                                       min(self.draws.min_load_s(p) for p in phys))
        return out


def _min_step_s(phys: EnginePhysics) -> float:
    return phys.decode_step_ms(1, 0) / 1000


def _per_token_s(phys: EnginePhysics) -> float:
    return min(phys.decode_step_ms(b, 0) / b for b in range(1, MAX_NUM_SEQS + 1)) / 1000


@dataclass(frozen=True)
class RunBounds:
    makespan_s: float
    latency_bounds_s: dict[str, float]  # per workflow id, in input order: its critical path from its arrival

    def p95_s(self, completed: Collection[str]) -> float:
        """The P95 bound over the `completed` workflows: the set the run's P95 is taken over."""
        return percentile([self.latency_bounds_s[w] for w in completed], 95)


def lower_bounds(workflows: Sequence[Workflow], cluster: ClusterSpec, draws: Draws, perturb: float = 0.0,
                 preloaded: frozenset[str] = frozenset()) -> RunBounds:
    """The bounds for `workflows` (with their arrival times) on `cluster`; `preloaded`: models some device holds
    at t = 0 (the warm regime)."""
    if not workflows:
        return RunBounds(0.0, {})
    best = _Best(cluster, perturb, draws)
    first = min(w.arrival_s for w in workflows)
    model_first_use: dict[str, float] = {}
    for w in sorted(workflows, key=lambda w: w.arrival_s):
        for st in w.stages.values():
            model_first_use.setdefault(st.model, w.arrival_s)
    ready_s = {m: -math.inf if m in preloaded else t + best.figures(m)[3] for m, t in model_first_use.items()}
    decode_s = prefill_total_s = 0.0
    seen_text: set[int] = set()
    path_end = -math.inf
    latency_bounds_s: dict[str, float] = {}
    for w in workflows:
        finish: dict[str, float] = {}
        for sid in w.order:
            st = w.stages[sid]
            per_token_s, step_s, prefill_s, _ = best.figures(st.model)
            outs = [draws.output_tokens(w.workflow_id, sid, i, st.expected_output_tokens, st.max_tokens)
                    for i in range(st.num_requests)]
            decode_s += sum(outs) * per_token_s
            for parts in st.prompts:
                for part in parts:
                    if isinstance(part, TextPart) and part.key not in seen_text:
                        seen_text.add(part.key)
                        prefill_total_s += part.tokens * prefill_s
            start = max([w.arrival_s, ready_s[st.model]] + [finish[p] for p in st.parents])
            finish[sid] = start + (max(outs) - 1) * step_s
        end = max(finish.values(), default=w.arrival_s)
        latency_bounds_s[w.workflow_id] = end - w.arrival_s
        path_end = max(path_end, end)
    work_end = first + max(decode_s, prefill_total_s) / len(cluster.devices)
    return RunBounds(max(work_end, path_end) - first, latency_bounds_s)


def run_lower_bounds(workflows: Sequence[Workflow], cluster: ClusterSpec, config: SimConfig) -> RunBounds:
    """The bounds of one simulator run, with the run's own draws, perturbation and preloaded models."""
    preloaded = frozenset(m for _, models in config.initial_models for m in models)
    return lower_bounds(workflows, cluster, config.draws(), config.truth_perturb, preloaded)
