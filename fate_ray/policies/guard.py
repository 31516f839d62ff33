"""GuardedPolicy: a planning round that raises, overruns its time budget or returns a plan that breaks the contract
never stalls a live run. The round is planned again by `least_loaded` (the simplest baseline, sharing no code with
FATE's solver or greedy), and its solver status says why: FALLBACK_ERROR, FALLBACK_TIMEOUT or FALLBACK_INVALID,
which the planner actor counts in `fate_solver_status_total` and logs.

The Ray planner uses it; the simulator and the tests do not: there a broken policy must fail loudly (a
PlanContractError with its traceback), never be papered over in a benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fate_ray.policies.base import Plan, Policy, PolicyContext, ReadyStage
from fate_ray.policies.least_loaded import LeastLoaded
from fate_ray.state import ClusterSnapshot

logger = logging.getLogger(__name__)
DEFAULT_BUDGET_S = 10.0  # far above any sane round (CP-SAT's own wall limit is 500 ms): this catches bugs, not slowness


def plan_problem(plan: Plan, frontier: Sequence[ReadyStage], snapshot: ClusterSnapshot, ctx: PolicyContext) -> str:
    """What breaks the contract (every request of every frontier stage placed once, on a live device that fits its
    model), or "" when nothing does."""
    devices = {d.device.device_id: d for d in snapshot.devices}
    stages = {s.key: s for s in frontier}
    placed: dict = {key: [] for key in stages}
    for a in plan.assignments:
        stage, dev = stages.get(a.stage), devices.get(a.device_id)
        if stage is None:
            return f"placed {a.stage}, which is not on the frontier"
        if dev is None or not dev.alive or not ctx.cluster.fits(stage.model, dev.device.type):
            return f"placed {a.stage} on {a.device_id!r}, not a live device that fits {stage.model!r}"
        placed[a.stage] += a.request_indices
    for key, stage in stages.items():
        if sorted(placed[key]) != sorted(stage.request_indices):
            return f"placed requests {sorted(placed[key])} of {key}, which has {sorted(stage.request_indices)}"
    return ""


class GuardedPolicy(Policy):
    """Runs `inner` with a time budget, checks its plan, and falls back to least_loaded for that round."""

    def __init__(self, inner: Policy, budget_s: float = DEFAULT_BUDGET_S):
        super().__init__(inner.ctx)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.own_prefetch = inner.own_prefetch
        self.budget_s = budget_s
        self.fallback = LeastLoaded(inner.ctx)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="plan")
        self._stuck: Future | None = None
        self._fell_back = False  # the last round

    def plan(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage]) -> Plan:
        if self._stuck is not None and not self._stuck.done():
            # Never two rounds of the inner policy at once (it keeps per-round state): wait for the stuck one.
            return self._fall_back(snapshot, frontier, "TIMEOUT", "an earlier round is still running")
        self._stuck = None
        future = self._pool.submit(self.inner.plan, snapshot, frontier)
        try:
            plan = future.result(timeout=self.budget_s)
        except FutureTimeout:
            self._stuck = future
            return self._fall_back(snapshot, frontier, "TIMEOUT", f"no plan within {self.budget_s:g} s")
        except Exception as exc:  # noqa: BLE001 -- any failure of a round is survived, and logged with its traceback
            logger.exception("policy %s raised while planning; this round falls back to least_loaded", self.name)
            return self._fall_back(snapshot, frontier, "ERROR", f"{exc.__class__.__name__}: {exc}")
        problem = plan_problem(plan, frontier, snapshot, self.ctx)
        if problem:
            return self._fall_back(snapshot, frontier, "INVALID", problem)
        self._fell_back = False
        return plan

    def candidate_terms(self, stage):
        # A round that fell back was placed by least_loaded, not by the inner policy's scores.
        return [] if self._fell_back else self.inner.candidate_terms(stage)

    def _fall_back(self, snapshot: ClusterSnapshot, frontier: Sequence[ReadyStage], kind: str, why: str) -> Plan:
        logger.error("policy %s: %s; this round falls back to least_loaded", self.name, why)
        self._fell_back = True
        plan = self.fallback.plan(snapshot, frontier)
        return Plan(plan.assignments, f"FALLBACK_{kind}", plan.prefetch)
