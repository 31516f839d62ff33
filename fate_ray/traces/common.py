"""The task -> LLM stage rule of the package docstring, implemented once for every trace format, plus the
errors and warnings the importers share."""

from __future__ import annotations

import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from fate_ray.schema.cluster import ClusterSpec
from fate_ray.schema.errors import InputError, Problem
from fate_ray.workload import ContextPart, OutputPart, Part, Stage, TextPart, Workflow, stable_key

SIZE_EXPONENT = 0.75  # model weight = params_b ** -0.75: a 32.8B model is drawn ~10x less often than a 1.5B one
PROMPT_TOKENS_PER_LOG2 = 256
PROMPT_TOKENS_RANGE = (128, 8192)
OUTPUT_TOKENS_PER_LOG2 = 32
OUTPUT_TOKENS_RANGE = (16, 1024)
JITTER = 0.2  # +-20%, so tasks of equal runtime do not all get identical sizes
SYSTEM_PREFIX_TOKENS_RANGE = (256, 2048)
CONTINUE_PROBABILITY = 0.3
MAX_PROMPT_PARENTS = 4  # parents whose outputs enter a prompt; a 50-way join would otherwise make huge prompts
MAX_FANOUT_REQUESTS = 64  # Alibaba instance_num reaches 14,669; one stage of that many requests says nothing more


class TraceWarning(UserWarning):
    """A row, request or edge of a trace that an importer skipped; the message starts with FILE:LINE."""


def warn(path: str | Path, line: int, message: str) -> None:
    warnings.warn(f"{path}:{line}: {message}", TraceWarning, stacklevel=3)


def input_error(path: str | Path, line: int, message: str) -> InputError:
    return InputError([Problem(str(path), line, message)])


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise input_error(path, 1, "no such file or directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise input_error(path, 1, f"cannot read the file ({exc.__class__.__name__}: {exc})") from None


def parse_json(text: str, path: str | Path, first_line: int = 1) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise input_error(path, line, f"the file is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise input_error(path, first_line, "the file is not usable JSON: nesting too deep") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line, read lazily so `limit`s stay cheap."""
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, parse_json(line, path, number)
    except FileNotFoundError:
        raise input_error(path, 1, "no such file or directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise input_error(path, 1, f"cannot read the file ({exc.__class__.__name__}: {exc})") from None


def trace_files(paths: str | Path | Iterable[str | Path], pattern: str = "*") -> Iterator[tuple[Path, bool]]:
    """(file, named) for each path: a named file as it is, a folder's files matching `pattern` below it in sorted
    path order (named False: a loader may skip those that are not its format). A missing path is an InputError."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if path.is_dir():
            for file in sorted(f for f in path.rglob(pattern) if f.is_file()):
                yield file, False
        elif path.is_file():
            yield path, True
        else:
            raise input_error(path, 1, "no such file or directory")


def catalog_models_of(cluster: ClusterSpec) -> dict[str, float]:
    """name -> params_b of the catalog models that fit at least one device of `cluster` (what importers draw)."""
    return {name: spec.params_b for name, spec in cluster.models.items() if cluster.devices_for(name)}


def rng_for(rng_seed: object, path: str | Path, *scope: object) -> random.Random:
    """One generator per file (and job): keyed by the file's name, so moving the data keeps the workflows."""
    return random.Random(stable_key(rng_seed, Path(path).name, *scope))


def models_by_type(type_counts: Mapping[str, int], rng: random.Random, catalog_models: Mapping[str, float]) -> dict:
    """Task type -> model; drawn most frequent type first (ties by name) so the draw order is fixed."""
    if not catalog_models:
        raise ValueError("catalog_models is empty: pass name -> params_b of the models that fit a device")
    names = sorted(catalog_models)
    weights = [catalog_models[n] ** -SIZE_EXPONENT for n in names]
    ranked = sorted(type_counts, key=lambda t: (-type_counts[t], t))
    return {t: rng.choices(names, weights)[0] for t in ranked}


def _clamp_tokens(value: float, bounds: tuple[int, int]) -> int:
    return int(min(bounds[1], max(bounds[0], round(value))))


def _log_runtime(runtime_s: float) -> float:
    return 1.0 + math.log2(1.0 + max(0.0, runtime_s))


def prompt_tokens(runtime_s: float, rng: random.Random) -> int:
    raw = PROMPT_TOKENS_PER_LOG2 * _log_runtime(runtime_s) * rng.uniform(1 - JITTER, 1 + JITTER)
    return _clamp_tokens(raw, PROMPT_TOKENS_RANGE)


def output_tokens(runtime_s: float, rng: random.Random) -> int:
    raw = OUTPUT_TOKENS_PER_LOG2 * _log_runtime(runtime_s) * rng.uniform(1 - JITTER, 1 + JITTER)
    return _clamp_tokens(raw, OUTPUT_TOKENS_RANGE)


@dataclass(frozen=True, slots=True)
class Task:
    """One task of a real DAG, format-free: what the mapping rule needs."""

    task_id: str
    task_type: str
    parents: tuple[str, ...]
    runtime_s: float
    width: int = 1  # parallel instances -> requests of the stage


def topological_order(tasks: Sequence[Task]) -> tuple[str, ...]:
    """Topological, ties broken by trace order; ValueError naming a cycle if there is one."""
    position = {t.task_id: i for i, t in enumerate(tasks)}
    graph = nx.DiGraph()
    graph.add_nodes_from(position)
    graph.add_edges_from((p, t.task_id) for t in tasks for p in t.parents)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(graph))
        raise ValueError(f"the tasks form a cycle ({cycle}), so this is not a DAG")
    return tuple(nx.lexicographical_topological_sort(graph, key=position.__getitem__))


def build_workflow(name: str, source: str, tasks: Sequence[Task], rng: random.Random,
                   catalog_models: Mapping[str, float]) -> Workflow:
    """Apply the mapping rule to format-free tasks (ValueError on a cycle)."""
    order = topological_order(tasks)
    by_id = {t.task_id: t for t in tasks}
    models = models_by_type(Counter(t.task_type for t in tasks), rng, catalog_models)
    system_tokens = {t: rng.randint(*SYSTEM_PREFIX_TOKENS_RANGE) for t in models}  # same rank order as models
    stages: dict[str, Stage] = {}
    for task_id in order:
        task = by_id[task_id]
        stages[task_id] = _task_stage(task, name, models[task.task_type], system_tokens, stages, rng)
    return Workflow(name, name, 0.0, stages, order, {}, source)


def _task_stage(task: Task, workflow: str, model: str, system_tokens: Mapping[str, int],
                done: Mapping[str, Stage], rng: random.Random) -> Stage:
    continued = task.parents[0] if len(task.parents) == 1 and rng.random() < CONTINUE_PROBABILITY else None
    expected = output_tokens(task.runtime_s, rng)
    prompts = tuple(_request_prompt(task, j, workflow, system_tokens, continued, done, rng)
                    for j in range(task.width))
    return Stage(stage_id=task.task_id, model=model, parents=task.parents, num_requests=len(prompts),
                 prompts=prompts, expected_output_tokens=expected, max_tokens=2 * expected,
                 shardable=len(prompts) > 1, continues=continued)


def _request_prompt(task: Task, item: int, workflow: str, system_tokens: Mapping[str, int], continued: str | None,
                    done: Mapping[str, Stage], rng: random.Random) -> tuple[Part, ...]:
    scope = (task.task_id,) if task.width == 1 else (task.task_id, item)
    own = TextPart(stable_key("task", workflow, *scope), prompt_tokens(task.runtime_s, rng))
    if continued is not None:
        # The parent's context already opens with its own system prompt: no second one.
        return ContextPart(continued, item % done[continued].num_requests), own
    system = TextPart(stable_key("sysprompt", workflow, task.task_type), system_tokens[task.task_type])
    # A parent as wide as the task feeds it item by item (a map after a map); otherwise all its outputs are read.
    inputs = (OutputPart(p, item if task.width > 1 and done[p].num_requests == task.width else None)
              for p in task.parents[:MAX_PROMPT_PARENTS])
    return system, *inputs, own
