"""The compiled workload the scheduler works on: workflows of stages whose prompts are symbolic token segments.

A workflow YAML (schema/workflow.py) or a real-trace importer compiles to a `Workflow`. Prompts are kept symbolic
because the tokens of a parent's output are only known once the parent has run: a request's prompt is a tuple of
parts (fixed text, a parent's output, a parent's whole context) that the Controller resolves to concrete
`Segment`s when the stage becomes ready, and so always before it is placed.

Segment keys are content hashes (blake2b, stable across processes), so two prompts that start with the same
system prompt or the same parent context produce the same prefix-cache blocks, exactly as vLLM's chained block
hashes would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4  # the usual English average for BPE tokenizers; used only where no tokenizer counted


def estimate_tokens(text: str) -> int:
    """Tokens of `text` when no tokenizer is at hand: at least one, CHARS_PER_TOKEN characters each."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def stable_key(*parts: object) -> int:
    """A 63-bit content hash that is the same in every process (unlike `hash(str)`)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def output_key(workflow_id: str, stage_id: str, index: int) -> int:
    """Segment key of a request's generated output (engines and the Controller must agree on it)."""
    return stable_key("out", workflow_id, stage_id, index)


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of tokens with one identity: equal keys mean equal tokens.

    For real engines a segment also carries what the engine needs to rebuild those tokens: its text, and for a
    generated output the exact token ids and the model that produced them (re-encoding generated text need not
    give the same ids, and then the continued context would miss the prefix cache). The planner reads only
    `key` and `tokens`.
    """

    key: int
    tokens: int
    text: str = field(default="", compare=False)
    token_ids: tuple[int, ...] = field(default=(), compare=False)
    model: str = field(default="", compare=False)  # whose tokenizer produced `token_ids`


@dataclass(frozen=True, slots=True)
class RequestShape:
    """A request as the planner's estimator sees it (cost.py): its prompt size, its prompt's full-block hashes
    (state.block_hashes) and its output length, expected for the planner, drawn for the truth."""

    prompt_tokens: int
    block_hashes: tuple[int, ...]
    output_tokens: int


@dataclass(frozen=True, slots=True)
class TextPart:
    """Fixed text known before the workflow runs (system prompt, rendered template). `text` is empty for a part
    given only as a token count (imported traces); a real engine then runs filler tokens of that count."""

    key: int
    tokens: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class OutputPart:
    """A parent's output: one request's (`item`) or all of them concatenated (`item is None`)."""

    parent: str
    item: int | None


@dataclass(frozen=True, slots=True)
class ContextPart:
    """A parent request's whole context (its prompt, then its output): the child continues that conversation."""

    parent: str
    item: int


Part = TextPart | OutputPart | ContextPart


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage: `num_requests` requests to `model`, shardable across devices when `shardable`."""

    stage_id: str
    model: str
    parents: tuple[str, ...]
    num_requests: int
    prompts: tuple[tuple[Part, ...], ...]  # one per request
    expected_output_tokens: int  # the planner's guess; true lengths are only known after the run
    max_tokens: int
    shardable: bool = True
    continues: str | None = None
    # For real engines: what is needed to render the prompt text (see schema/templates.py).
    prefix_text: str = ""
    template: str = ""
    map_source: str | None = None
    repeat: int = 1


@dataclass(frozen=True)
class Workflow:
    """A DAG of stages with an arrival time; `order` is topological."""

    workflow_id: str
    name: str
    arrival_s: float
    stages: Mapping[str, Stage]
    order: tuple[str, ...]
    inputs: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # where it came from (file path, trace record), for messages

    def children(self) -> dict[str, tuple[str, ...]]:
        kids: dict[str, list[str]] = {s: [] for s in self.order}
        for sid in self.order:
            for p in self.stages[sid].parents:
                kids[p].append(sid)
        return {k: tuple(v) for k, v in kids.items()}

    def with_arrival(self, workflow_id: str, arrival_s: float) -> Workflow:
        """The same DAG submitted again: a new id (so its outputs are its own) at another time."""
        return Workflow(workflow_id, self.name, arrival_s, self.stages, self.order, self.inputs, self.source)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(s.model for s in self.stages.values())


def expected_prompt_tokens(workflow: Workflow) -> dict[str, list[int]]:
    """Prompt sizes per request with parents' outputs at their expected length (for ranks and bounds)."""
    return _prompt_tokens(workflow, lambda st: st.expected_output_tokens)


def longest_prompt_tokens(workflow: Workflow) -> dict[str, int]:
    """Each stage's longest prompt with parents' outputs at their `max_tokens`: no run can exceed it."""
    return {sid: max(sizes, default=0) for sid, sizes in _prompt_tokens(workflow, lambda st: st.max_tokens).items()}


def _prompt_tokens(workflow: Workflow, output_tokens) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for sid in workflow.order:
        st = workflow.stages[sid]
        sizes = []
        for parts in st.prompts:
            n = 0
            for part in parts:
                if isinstance(part, TextPart):
                    n += part.tokens
                elif isinstance(part, OutputPart):
                    parent = workflow.stages[part.parent]
                    k = parent.num_requests if part.item is None else 1
                    n += k * output_tokens(parent)
                elif isinstance(part, ContextPart):
                    parent = workflow.stages[part.parent]
                    n += out[part.parent][part.item] + output_tokens(parent)
            sizes.append(n)
        out[sid] = sizes
    return out
