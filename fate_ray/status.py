"""What shells may read of the Controller: frozen copies, valid while `handle` runs in another thread."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fate_ray.progress import WorkflowRun


@dataclass
class ControllerStats:
    planning_rounds: int = 0
    shards_dispatched: int = 0
    duplicate_finishes: int = 0
    retries: int = 0
    prefetches: int = 0
    solver_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkflowStatus:
    workflow_id: str
    stages_done: int
    stages: int
    done: bool
    failure_reason: str  # empty unless the workflow failed


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    device_id: str
    alive: bool
    running_shards: int
    concurrency: int
    queued_shards: int
    active_models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StageOutputs:
    outputs: Mapping[int, str]  # request index -> text (real engines)
    output_tokens: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class ControllerStatus:
    """What a shell may read of the Controller: copied, so it stays valid while `handle` runs elsewhere."""

    now_s: float
    workflows: Mapping[str, WorkflowStatus]  # submitted and not yet released
    devices: tuple[DeviceStatus, ...]
    outputs: Mapping[str, Mapping[str, StageOutputs]]  # workflow -> stage -> outputs, for those asked for
    stats: ControllerStats


def stage_outputs(run: WorkflowRun) -> dict[str, StageOutputs]:
    return {sid: StageOutputs(MappingProxyType(dict(st.outputs)), MappingProxyType(dict(st.output_tokens)))
            for sid, st in run.stages.items()}
