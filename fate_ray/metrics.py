"""Prometheus metrics of the planner, named `fate_*` (Ray exports them as `ray_fate_*` on the head's metrics port).

Recorded by the PlannerActor shell, never by the pure Controller. Gauges are re-set on a timer by the actor:
Ray drops a gauge that has not been set for ~15-20 s.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_SECONDS = [0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
_DRIFT_TOKENS = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]  # Ray wants positive boundaries
_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 5000]


class PlannerMetrics:
    """Every series carries a `planner` tag (the actor's name), so planners sharing a cluster stay apart."""

    def __init__(self, planner: str) -> None:
        self.stage_latency_s = Histogram("fate_stage_latency_s", "Ready to last output of a stage (engine s).",
                                         _SECONDS, ("model", "planner"))
        self.workflow_latency_s = Histogram("fate_workflow_latency_s", "Submission to completion of a workflow "
                                            "(engine s).", _SECONDS, ("outcome", "planner"))
        self.queue_wait_s = Histogram("fate_queue_wait_s", "Stage ready to shard dispatch (engine s).", _SECONDS,
                                      ("planner",))
        self.plan_latency_ms = Histogram("fate_plan_latency_ms", "Wall time of one planning round.", _MS,
                                         ("policy", "planner"))
        self.frontier_size = Gauge("fate_frontier_size", "Stages planned in the last round.",
                                   ("policy", "planner"))
        self.solver_status = Counter("fate_solver_status_total", "Planning rounds by solver status.",
                                     ("policy", "status", "planner"))
        self.model_events = Counter("fate_model_events_total", "Model loads, wakes and evictions.",
                                    ("device", "kind", "planner"))
        self.prefix_hit_tokens = Counter("fate_prefix_hit_tokens_total", "Prompt tokens served from prefix caches.",
                                         ("device", "planner"))
        self.prefix_query_tokens = Counter("fate_prefix_query_tokens_total", "Prompt tokens of finished shards.",
                                           ("device", "planner"))
        self.shards = Counter("fate_shards_total", "Shards by outcome.", ("outcome", "planner"))
        self.device_busy = Gauge("fate_device_busy_ratio", "Running shards / concurrency, per device.",
                                 ("device", "planner"))
        self.prefix_drift_tokens = Histogram(
            "fate_prefix_prediction_drift_tokens", "Per request: |the planner's predicted cached tokens - the "
            "engine's (vLLM's num_cached_tokens, or the simulated engine's)|.", _DRIFT_TOKENS, ("planner",))
        for metric in vars(self).values():
            metric.set_default_tags({"planner": planner})

    def observe_drift(self, predicted: tuple[int, ...], measured: tuple[int, ...]) -> None:
        for p, m in zip(predicted, measured):
            self.prefix_drift_tokens.observe(abs(p - m))
