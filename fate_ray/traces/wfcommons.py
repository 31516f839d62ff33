"""WfCommons WfFormat 1.5 JSON -> one Workflow (one stage of one request per task)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fate_ray.traces.common import Task, build_workflow, input_error, parse_json, read_text, rng_for, warn
from fate_ray.workload import Workflow

_NAME_SUFFIX = re.compile(r"_ID\d+$|_\d+$")  # Pegasus "mProject_ID0000001", Nextflow ids "FASTQC_2"


def is_wfformat(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("workflow"), dict)


def load_wfcommons(path: str | Path, rng_seed: object, catalog_models: Mapping[str, float]) -> Workflow:
    """Read a WfFormat file; InputError naming the file if it is not one, TraceWarning for dropped edges."""
    text = read_text(path)
    doc = parse_json(text, path)
    if not is_wfformat(doc):
        raise input_error(path, 1, "not a WfFormat document: expected a top-level `workflow` mapping")
    spec_tasks = (doc["workflow"].get("specification") or {}).get("tasks")
    if not isinstance(spec_tasks, list) or not spec_tasks:
        raise input_error(path, 1, "WfFormat `workflow.specification.tasks` must be a non-empty list")
    executed = (doc["workflow"].get("execution") or {}).get("tasks") or []
    by_id = {e["id"]: e for e in executed if isinstance(e, dict) and "id" in e}
    tasks = _tasks(path, text, spec_tasks, by_id)
    try:
        return build_workflow(Path(path).stem, str(path), tasks, rng_for(rng_seed, path), catalog_models)
    except ValueError as exc:
        raise input_error(path, 1, str(exc)) from None


def task_type(spec_task: Mapping[str, Any], executed: Mapping[str, Any] | None) -> str:
    """`command.program` when it is a program name; Nextflow puts a whole shell script there, so then the name."""
    program = ((executed or {}).get("command") or {}).get("program")
    if isinstance(program, str) and program.strip() and not any(c.isspace() for c in program.strip()):
        return Path(program.strip()).name
    return _NAME_SUFFIX.sub("", str(spec_task.get("name") or spec_task["id"]))


def _tasks(path: str | Path, text: str, spec_tasks: list, executed: Mapping[str, Any]) -> list[Task]:
    ids = [t.get("id") if isinstance(t, dict) else None for t in spec_tasks]
    for index, task_id in enumerate(ids):
        if not isinstance(task_id, str) or not task_id:
            raise input_error(path, 1, f"WfFormat task #{index} has no string `id`")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise input_error(path, _line_of(text, twice), f"WfFormat task id {twice!r} appears twice")
    known = set(ids)
    tasks = []
    for spec_task in spec_tasks:
        task_id = spec_task["id"]
        parents = []
        for parent in spec_task.get("parents") or []:
            if parent in known and parent != task_id:
                parents.append(parent)
            else:
                warn(path, _line_of(text, task_id), f"task {task_id!r} lists parent {parent!r}, which is not a "
                     "task of this workflow; edge dropped")
        tasks.append(Task(task_id, task_type(spec_task, executed.get(task_id)), tuple(dict.fromkeys(parents)),
                          _runtime_s(executed.get(task_id))))
    return tasks


def _runtime_s(executed: Mapping[str, Any] | None) -> float:
    """`runtimeInSeconds`; a task without a usable one counts as instantaneous (smallest sizes)."""
    runtime = (executed or {}).get("runtimeInSeconds")
    return float(runtime) if isinstance(runtime, (int, float)) and runtime == runtime else 0.0


def _line_of(text: str, task_id: str) -> int:
    """Line of the first `"id": "<task_id>"` (JSON carries no positions; this is enough to find the task)."""
    at = text.find(f'"{task_id}"')
    return text.count("\n", 0, at) + 1 if at >= 0 else 1
