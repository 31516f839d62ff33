"""Which worker state reports the planner adopts.

A worker's report (engines/base.py `EngineReport`) replaces the planner's belief about its device. A report is
taken on the worker and read on the planner later; a command the planner sent meanwhile (a dispatch that loads a
model, a prefetch) is not in it, and adopting it would undo that command in the belief. So each report carries
how many commands the worker had received, and it is adopted only when that is every command sent to it.
"""

from __future__ import annotations

from fate_ray.events import WorkerStateReported

REPORT_INTERVAL_S = 5.0


class ReportGate:
    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval_s = interval_s  # 0: reports are not asked for
        self._sent: dict[str, int] = {}  # device id -> Dispatch and LoadModel commands sent
        self.adopted = 0
        self.stale = 0

    def sent(self, device_id: str) -> None:
        self._sent[device_id] = self._sent.get(device_id, 0) + 1

    def event(self, device_id: str, report, now_s: float) -> WorkerStateReported | None:
        """The event to hand the Controller, or None when the report is stale or reports are off."""
        if not self.interval_s:
            return None
        if report.commands_seen != self._sent.get(device_id, 0):
            self.stale += 1
            return None
        self.adopted += 1
        return WorkerStateReported(device_id, now_s, dict(report.residency), dict(report.blocks))
