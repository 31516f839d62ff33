"""One running workflow's bookkeeping: which stages are ready, which requests are placed, and every output once.

Owned by the Controller. A request's output is recorded at most once (a late or duplicate finish from a worker
that was presumed dead is dropped), so no stage output is lost or duplicated when a worker dies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fate_ray.cost import TEXT_BYTES_PER_TOKEN
from fate_ray.state import block_hashes
from fate_ray.workload import ContextPart, OutputPart, Segment, Stage, TextPart, Workflow, output_key


@dataclass(frozen=True)
class DagInfo:
    """Read-only facts about one DAG that planners look ahead with (shared by every instance of the DAG)."""

    stages: Mapping[str, Stage]
    children: Mapping[str, tuple[str, ...]]
    prompt_tokens: Mapping[str, list[int]]  # per request, parents' outputs at their expected length
    ranks_s: Mapping[str, float]  # upward rank: estimated longest path from the stage to a sink
    # Planners' memo of per-stage estimates (FATE's stateless service time per device type): it lives and dies with
    # the DAG, so a long-lived planner's memo never outgrows the DAGs it still holds.
    memo: dict = field(default_factory=dict, compare=False, repr=False)


def upward_ranks(children: Mapping[str, Sequence[str]], cost_s: Callable[[str], float]) -> dict[str, float]:
    """HEFT's upward rank of every stage: its cost plus the largest rank among its children (the longest path
    from it to a sink)."""
    ranks: dict[str, float] = {}
    for root in children:
        stack = [(root, False)]
        while stack:  # post-order: every child's rank before its parent's
            sid, children_done = stack.pop()
            if sid in ranks:
                continue
            if children_done:
                ranks[sid] = cost_s(sid) + max((ranks[c] for c in children[sid]), default=0.0)
            else:
                stack.append((sid, True))
                stack.extend((c, False) for c in children[sid] if c not in ranks)
    return ranks


@dataclass
class StageRun:
    stage: Stage
    rank_s: float
    waiting_on: int  # parents not done yet
    pending: set[int] = field(default_factory=set)  # requests ready but not placed
    prompts: list[tuple[Segment, ...]] = field(default_factory=list)  # resolved when the stage becomes ready
    hashes: list[tuple[int, ...]] = field(default_factory=list)
    output_tokens: dict[int, int] = field(default_factory=dict)
    output_node: dict[int, str] = field(default_factory=dict)
    output_device: dict[int, str] = field(default_factory=dict)
    output_segments: dict[int, Segment] = field(default_factory=dict)
    ready_s: float = 0.0  # when its last parent finished (Controller clock)

    @property
    def done(self) -> bool:
        return len(self.output_tokens) == self.stage.num_requests

    @property
    def outputs(self) -> dict[int, str]:
        """The text of each recorded output (real engines; empty where none was returned)."""
        return {i: seg.text for i, seg in self.output_segments.items() if seg.text}

    def output_segment(self, index: int) -> Segment:
        return self.output_segments[index]


class WorkflowRun:
    """Stage states of one workflow; `resolve` turns symbolic prompts into segments once parents are done."""

    def __init__(self, workflow: Workflow, dag: DagInfo, block_tokens: int):
        self.workflow = workflow
        self.dag = dag
        self.block_tokens = block_tokens
        self.children = dag.children
        self.stages = {sid: StageRun(st, dag.ranks_s[sid], len(st.parents)) for sid, st in workflow.stages.items()}
        self.remaining = len(self.stages)
        self.failure_reason = ""  # why the workflow failed; empty while it has not

    @property
    def failed(self) -> bool:
        return bool(self.failure_reason)

    @property
    def workflow_id(self) -> str:
        return self.workflow.workflow_id

    def initially_ready(self) -> list[str]:
        return [sid for sid in self.workflow.order if not self.workflow.stages[sid].parents]

    def make_ready(self, stage_id: str, now_s: float) -> None:
        run = self.stages[stage_id]
        run.ready_s = now_s
        run.prompts = [self._resolve(parts) for parts in run.stage.prompts]
        run.hashes = [block_hashes(p, self.block_tokens) for p in run.prompts]
        run.pending = set(range(run.stage.num_requests))

    def _resolve(self, parts) -> tuple[Segment, ...]:
        out: list[Segment] = []
        for part in parts:
            if isinstance(part, TextPart):
                out.append(Segment(part.key, part.tokens, part.text))
            elif isinstance(part, OutputPart):
                parent = self.stages[part.parent]
                items = range(parent.stage.num_requests) if part.item is None else (part.item,)
                out.extend(parent.output_segment(i) for i in items)
            elif isinstance(part, ContextPart):
                parent = self.stages[part.parent]
                out.extend(parent.prompts[part.item])
                out.append(parent.output_segment(part.item))
        return tuple(out)

    def input_bytes_by_node(self, stage_id: str) -> dict[str, int]:
        """Bytes of parent outputs each node holds: what a device elsewhere would have to pull."""
        by_node: dict[str, int] = {}
        for p in self.workflow.stages[stage_id].parents:
            parent = self.stages[p]
            for i, node in parent.output_node.items():
                by_node[node] = by_node.get(node, 0) + parent.output_tokens[i] * TEXT_BYTES_PER_TOKEN
        return by_node

    def record(self, stage_id: str, index: int, tokens: int, text: str, device_id: str, node: str,
               token_ids: tuple[int, ...] = ()) -> bool:
        """Record one request's output; False if it was already recorded (a duplicate finish)."""
        run = self.stages[stage_id]
        if index in run.output_tokens:
            return False
        run.output_tokens[index] = tokens
        run.output_segments[index] = Segment(output_key(self.workflow_id, stage_id, index), tokens, text, token_ids,
                                             run.stage.model if token_ids else "")
        run.output_node[index] = node
        run.output_device[index] = device_id
        return True

    def full_hashes(self, stage_id: str, index: int) -> tuple[int, ...]:
        """Blocks of prompt + output: what the device caches after running the request."""
        run = self.stages[stage_id]
        return block_hashes(run.prompts[index] + (run.output_segment(index),), self.block_tokens)

    def complete(self, stage_id: str) -> list[str]:
        """Mark a stage done; returns the children that became ready."""
        self.remaining -= 1
        ready = []
        for child in self.children[stage_id]:
            run = self.stages[child]
            run.waiting_on -= 1
            if run.waiting_on == 0:
                ready.append(child)
        return ready
