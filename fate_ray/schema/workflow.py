"""Workflow YAML: a DAG of LLM stages, validated against a cluster's model catalog and compiled to a `Workflow`.

Shape (see workflows/*.yaml):

    name: doc-qa
    models: [qwen2.5-1.5b, llama3.1-8b]       # optional; if given, every stage's model must be listed
    inputs: {question: "...", documents: [...]}
    stages:
      - id: summarize
        model: qwen2.5-1.5b
        map: inputs.documents                   # one request per item (or `<parent>.outputs`)
        prompt: {prefix: "You summarise reports.\\n", template: "Report:\\n{{ item }}\\nSummary:"}
        max_tokens: 128
      - id: answer
        model: llama3.1-8b
        after: [summarize]
        prompt: {template: "Q: {{ inputs.question }}\\nNotes:\\n{{ summarize.output }}"}
        max_tokens: 256

Token counts: `prompt.prefix_tokens` / `prompt.tokens` give the prefix's and the rendered template's size; when
absent they are estimated at 4 characters per token. A parent's output counts with its real length at run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import networkx as nx
from pydantic import Field, ValidationError, model_validator

from fate_ray.schema.cluster import ClusterSpec, FrozenModel
from fate_ray.schema.errors import InputError, Problem, did_you_mean
from fate_ray.schema.templates import LOOP_VARIABLES, ParentOutputs, inspect_template, render
from fate_ray.schema.yaml_lines import LocatedYaml, load_located, parse_located
from fate_ray.workload import (
    ContextPart,
    OutputPart,
    Part,
    Stage,
    TextPart,
    Workflow,
    estimate_tokens,
    longest_prompt_tokens,
    stable_key,
)

MAX_REPEAT = 1024  # samples per item; more is a typo, not a workload
# Strict: `max_tokens: true` or `repeat: "3"` are mistakes, not 1 and 3.
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
_ID = r"^[A-Za-z_][A-Za-z0-9_\-]*$"


class PromptSpec(FrozenModel):
    prefix: str = Field("", description="Text shared by every request of the stage (system prompt, documents).")
    template: str = Field("", description="Jinja2 template of the request-specific part (sandboxed).")
    prefix_tokens: PositiveInt | None = Field(None, description="Size of `prefix` in tokens; default chars/4.")
    tokens: PositiveInt | None = Field(None, description="Size of the rendered template in tokens; default chars/4.")


class StageSpec(FrozenModel):
    id: str = Field(pattern=_ID, description="Unique within the workflow; templates refer to it by this name.")
    model: str = Field(description="A model of the cluster's catalog.")
    after: list[str] = Field(default_factory=list, description="Parent stages that must finish first.")
    continues: str | None = Field(None, description="A parent whose conversation (prompt + output) this extends.")
    map: str | None = Field(None, description="`inputs.<list>` or `<parent>.outputs`: one request per element.")
    repeat: PositiveInt = Field(1, le=MAX_REPEAT, description="Samples per element (self-consistency fan-out).")
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    max_tokens: PositiveInt = Field(description="Output token limit per request.")
    output_tokens: PositiveInt | None = Field(None, description="Expected output tokens; default max_tokens / 2.")

    @model_validator(mode="after")
    def _check(self) -> StageSpec:
        if self.output_tokens is not None and self.output_tokens > self.max_tokens:
            raise ValueError(f"output_tokens ({self.output_tokens}) exceeds max_tokens ({self.max_tokens}); "
                             "raise max_tokens or lower output_tokens")
        p = self.prompt
        if not (p.prefix or p.template or p.prefix_tokens or p.tokens or self.continues):
            raise ValueError(f"stage {self.id!r} has an empty prompt; give prompt.template (or prompt.tokens)")
        return self

    @property
    def parents(self) -> list[str]:
        return list(dict.fromkeys(self.after + ([self.continues] if self.continues else [])))


class WorkflowSpec(FrozenModel):
    name: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list, description="Models the workflow uses (checked if given).")
    inputs: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)


def load_workflow(path: str | Path, cluster: ClusterSpec,
                  count_tokens: TokenCounter | None = None) -> tuple[WorkflowSpec, Workflow]:
    """Parse, validate and compile one workflow file; raise InputError with every problem found.
    `count_tokens(model, text)`: the models' own tokenizers, for real engines (else characters / 4)."""
    return check_workflow(load_located(path), cluster, count_tokens)


def parse_workflow_text(text: str, file: str, cluster: ClusterSpec) -> tuple[WorkflowSpec, Workflow]:
    return check_workflow(parse_located(text, file), cluster)


def check_workflow(doc: LocatedYaml, cluster: ClusterSpec,
                   count_tokens: TokenCounter | None = None) -> tuple[WorkflowSpec, Workflow]:
    if not isinstance(doc.data, dict):
        raise InputError([doc.problem((), "a workflow file must be a mapping with `name` and `stages`")])
    try:
        spec = WorkflowSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise InputError(doc.problems_from(exc)) from None
    problems = _semantic_problems(spec, doc, cluster)
    if problems:
        raise InputError(problems)
    try:
        workflow = compile_workflow(spec, workflow_id=spec.name, source=doc.file, count_tokens=count_tokens)
    except StageTemplateError as exc:
        at = ("stages", [s.id for s in spec.stages].index(exc.stage_id), "prompt", "template")
        raise InputError([doc.problem(at, str(exc))]) from None
    problems = _context_length_problems(spec, workflow, doc, cluster)
    if problems:
        raise InputError(problems)
    return spec, workflow


def _context_length_problems(spec: WorkflowSpec, workflow: Workflow, doc: LocatedYaml,
                             cluster: ClusterSpec) -> list[Problem]:
    """A prompt that cannot fit its model's context is refused here, not by the engine mid-run: parents' outputs
    are taken at their `max_tokens`, so no run of the workflow can exceed the bound."""
    out = []
    longest = longest_prompt_tokens(workflow)
    for i, stage in enumerate(spec.stages):
        limit = cluster.models[stage.model].max_model_len
        need = longest[stage.id] + stage.max_tokens
        if limit and need > limit:
            out.append(doc.problem(("stages", i), f"stage {stage.id!r}: its longest prompt ({longest[stage.id]} "
                                   f"tokens, parents' outputs at their max_tokens) plus max_tokens {stage.max_tokens} "
                                   f"is {need} tokens, over model {stage.model!r}'s max_model_len {limit}; shorten "
                                   "the prompt or lower max_tokens here or in its parents"))
    return out


def _semantic_problems(spec: WorkflowSpec, doc: LocatedYaml, cluster: ClusterSpec) -> list[Problem]:
    out: list[Problem] = []
    ids = [s.id for s in spec.stages]
    where: dict[str, int] = {}
    for i, stage in enumerate(spec.stages):
        if stage.id in where:
            out.append(doc.problem(("stages", i, "id"), f"duplicate stage id {stage.id!r}; stage ids must be unique"))
        where.setdefault(stage.id, i)
    for j, name in enumerate(spec.models):
        if name not in cluster.models:
            out.append(doc.problem(("models", j), f"unknown model {name!r}{did_you_mean(name, cluster.models)}"))
    for i, stage in enumerate(spec.stages):
        at = ("stages", i)
        out += _stage_model_problems(stage, at, spec, doc, cluster)
        for k, parent in enumerate(stage.after):
            if parent not in where:
                out.append(doc.problem(at + ("after", k), f"stage {stage.id!r} depends on unknown stage "
                                       f"{parent!r}{did_you_mean(parent, ids)}"))
        if stage.continues and stage.continues not in where:
            out.append(doc.problem(at + ("continues",), f"stage {stage.id!r} continues unknown stage "
                                   f"{stage.continues!r}{did_you_mean(stage.continues, ids)}"))
    if out:
        return out
    cycle = _find_cycle(spec)
    if cycle:
        first = where[cycle[0]]
        return [doc.problem(("stages", first, "after"), "dependency cycle " + " -> ".join(cycle + [cycle[0]])
                            + "; remove one of these dependencies")]
    for i, stage in enumerate(spec.stages):
        out += _stage_prompt_problems(stage, ("stages", i), spec, doc)
    return out


def _stage_model_problems(stage: StageSpec, at, spec: WorkflowSpec, doc: LocatedYaml, cluster: ClusterSpec):
    if stage.model not in cluster.models:
        return [doc.problem(at + ("model",), f"stage {stage.id!r} uses unknown model "
                            f"{stage.model!r}{did_you_mean(stage.model, cluster.models)}")]
    if spec.models and stage.model not in spec.models:
        return [doc.problem(at + ("model",), f"stage {stage.id!r} uses model {stage.model!r} which is not in the "
                            "workflow's `models` list; add it there")]
    if not cluster.devices_for(stage.model):
        need = cluster.models[stage.model].footprint_gib
        biggest = max(cluster.device_types[d.type].memory_gib for d in cluster.devices)
        return [doc.problem(at + ("model",), f"model {stage.model!r} needs {need:g} GiB (weights + KV reserve) and "
                            f"fits no device of cluster {cluster.name!r} (largest {biggest:g} GiB, or no profile); "
                            "use a smaller model or a cluster with a bigger GPU")]
    return []


def _find_cycle(spec: WorkflowSpec) -> list[str]:
    try:
        return [u for u, _ in nx.find_cycle(_graph(spec))]
    except nx.NetworkXNoCycle:
        return []


def _stage_prompt_problems(stage: StageSpec, at, spec: WorkflowSpec, doc: LocatedYaml) -> list[Problem]:
    out = []
    try:
        info = inspect_template(stage.prompt.template)
    except ValueError as exc:
        return [doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: {exc}")]
    parents = set(stage.parents)
    for name in sorted(info.names):
        if name == "inputs" or name in parents:
            continue
        if name in LOOP_VARIABLES:
            if name in ("item", "index") and not stage.map:
                out.append(doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: template uses "
                                       f"{name!r} but the stage has no `map`; add `map:` or remove it"))
            continue
        hint = "add it to `after`" if name in {s.id for s in spec.stages} else "no parent or input provides it"
        out.append(doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: template variable {name!r} is "
                               f"undefined; {hint}"))
    for key in sorted(info.input_keys - set(spec.inputs)):
        out.append(doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: template uses 'inputs.{key}' but "
                               f"the workflow has no input {key!r}{did_you_mean(key, spec.inputs)}"))
    for parent in parents & set(info.attrs_of):
        for attr in info.attrs_of[parent] - {"outputs", "output"}:
            out.append(doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: '{parent}.{attr}' is not "
                                   f"available; use '{parent}.outputs' or '{parent}.output'"))
    if stage.map:
        out += _map_problems(stage, at, spec, doc)
    if not out:
        try:
            first = spec.inputs[stage.map[7:]][0] if stage.map and stage.map.startswith("inputs.") else ""
            _render_static(stage, spec, first, 0, 0)
        except ValueError as exc:
            out.append(doc.problem(at + ("prompt", "template"), f"stage {stage.id!r}: {exc}"))
    return out


def _map_problems(stage: StageSpec, at, spec: WorkflowSpec, doc: LocatedYaml) -> list[Problem]:
    source = stage.map or ""
    m = re.fullmatch(r"inputs\.([A-Za-z_][\w\-]*)|([A-Za-z_][\w\-]*)\.outputs", source)
    if not m:
        return [doc.problem(at + ("map",), f"stage {stage.id!r}: map {source!r} must be 'inputs.<list>' or "
                            "'<parent>.outputs'")]
    if m.group(1):
        value = spec.inputs.get(m.group(1))
        if not isinstance(value, list) or not value:
            return [doc.problem(at + ("map",), f"stage {stage.id!r}: map needs input {m.group(1)!r} to be a "
                                "non-empty list")]
    elif m.group(2) not in stage.parents:
        return [doc.problem(at + ("map",), f"stage {stage.id!r}: map over {m.group(2)!r} which is not a parent; "
                            "add it to `after`")]
    return []


class StageTemplateError(ValueError):
    """A stage's template failed for one of its items (validation renders only the first)."""

    def __init__(self, stage_id: str, message: str):
        super().__init__(f"stage {stage_id!r}: {message}")
        self.stage_id = stage_id


TokenCounter = Callable[[str, str], int]  # (model, text) -> tokens


def _count(count_tokens: TokenCounter | None, model: str, text: str, written: int | None) -> int:
    if count_tokens is not None and text:
        return count_tokens(model, text)
    return written or estimate_tokens(text)


def compile_workflow(spec: WorkflowSpec, workflow_id: str, arrival_s: float = 0.0, source: str = "",
                     count_tokens: TokenCounter | None = None) -> Workflow:
    """Turn a validated spec into symbolic per-request prompts (see workload.py). Text is counted with
    `count_tokens(model, text)` when given (real engines: the model's tokenizer, which overrides a count written
    in the YAML), else a count written in the YAML, else characters / 4."""
    stages: dict[str, Stage] = {}
    order = list(nx.topological_sort(_graph(spec)))
    by_id = {s.id: s for s in spec.stages}
    for sid in order:
        st = by_id[sid]
        items, item_parent = _map_items(st, spec, stages)
        prefix = st.prompt.prefix
        # A prefix is keyed by its text, so equal system prompts share cache blocks across stages and workflows;
        # a prefix given only as a token count is private to its stage.
        prefix_key = stable_key("prefix", prefix) if prefix else stable_key("prefix", workflow_id, sid)
        prefix_part = TextPart(prefix_key, _count(count_tokens, st.model, prefix, st.prompt.prefix_tokens), prefix) \
            if prefix or st.prompt.prefix_tokens else None
        info = inspect_template(st.prompt.template)
        referenced = [p for p in st.parents
                      if (p in info.names or (p == item_parent and "item" in info.names)) and p != st.continues]
        prompts: list[tuple[Part, ...]] = []
        rendered: dict[tuple[int, int], str] = {}
        for r in range(len(items) * st.repeat):
            i = r // st.repeat
            parts: list[Part] = []
            if st.continues:
                parts.append(ContextPart(st.continues, i % stages[st.continues].num_requests))
            if prefix_part:
                parts.append(prefix_part)
            parts += [OutputPart(p, i if p == item_parent else None) for p in referenced]
            if st.prompt.template or st.prompt.tokens:
                sample = r % st.repeat if "sample" in info.names else 0
                if (i, sample) not in rendered:
                    try:
                        rendered[i, sample] = _render_static(st, spec, items[i], i, sample)
                    except ValueError as exc:
                        raise StageTemplateError(sid, f"item {i}: {exc}") from None
                text = rendered[i, sample]
                # Keyed by request item, not sample: the `repeat` samples of one item share their whole prompt.
                parts.append(TextPart(stable_key("text", workflow_id, sid, i, text),
                                      _count(count_tokens, st.model, text, st.prompt.tokens), text))
            prompts.append(tuple(parts))
        stages[sid] = Stage(
            stage_id=sid, model=st.model, parents=tuple(st.parents), num_requests=len(prompts),
            prompts=tuple(prompts), expected_output_tokens=st.output_tokens or max(1, st.max_tokens // 2),
            max_tokens=st.max_tokens, shardable=len(prompts) > 1, continues=st.continues, prefix_text=prefix,
            template=st.prompt.template, map_source=st.map, repeat=st.repeat,
        )
    return Workflow(workflow_id, spec.name, arrival_s, stages, tuple(order), dict(spec.inputs), source)


def _graph(spec: WorkflowSpec) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(s.id for s in spec.stages)
    g.add_edges_from((p, s.id) for s in spec.stages for p in s.parents)
    return g


def _map_items(st: StageSpec, spec: WorkflowSpec, done: dict[str, Stage]) -> tuple[list[Any], str | None]:
    if not st.map:
        return [None], None
    if st.map.startswith("inputs."):
        return list(spec.inputs[st.map.removeprefix("inputs.")]), None
    parent = st.map.removesuffix(".outputs")
    return [""] * done[parent].num_requests, parent


def _render_static(st: StageSpec, spec: WorkflowSpec, item: Any, index: int, sample: int) -> str:
    """The template's own text: parents' outputs render empty here, they are counted with their real size."""
    context: dict[str, Any] = {p: ParentOutputs([]) for p in st.parents}
    context.update(inputs=spec.inputs, item=item, index=index, sample=sample)
    return render(st.prompt.template, context)
