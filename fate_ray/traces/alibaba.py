"""Alibaba cluster-trace-v2018 `batch_task` CSV -> one Workflow per job (one stage per task, a request per
instance up to MAX_FANOUT_REQUESTS)."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fate_ray.traces.common import (
    MAX_FANOUT_REQUESTS,
    Task,
    build_workflow,
    input_error,
    read_text,
    rng_for,
    warn,
)
from fate_ray.workload import Workflow

HEADER = ("task_name", "job_name", "instance_num", "status", "start_time", "end_time", "field7", "plan_cpu",
          "plan_mem")
_DAG_NAME = re.compile(r"([A-Za-z]+)(\d+)((?:_\d+)*)")  # M5_3_4: task 5 after tasks 3 and 4
_INDEPENDENT_NAME = re.compile(r"task_\S+")  # no dependencies


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    job: str
    name: str
    stage_id: str
    number: int | None
    deps: tuple[int, ...]
    instances: int
    runtime_s: float


def has_alibaba_header(first_line: str) -> bool:
    return tuple(h.strip() for h in first_line.strip().split(",")) == HEADER


def load_alibaba(path: str | Path, rng_seed: object, catalog_models: Mapping[str, float]) -> list[Workflow]:
    """One workflow per job, in order of first appearance; bad rows, edges and cyclic jobs warn and are skipped."""
    jobs: dict[str, list[_Row]] = {}
    for row in _read_rows(path):
        jobs.setdefault(row.job, []).append(row)
    workflows = []
    for job, rows in jobs.items():
        tasks = _job_tasks(path, job, rows)
        try:
            workflows.append(build_workflow(job, str(path), tasks, rng_for(rng_seed, path, job), catalog_models))
        except ValueError as exc:
            warn(path, rows[0].line, f"job {job} skipped: {exc}")
    return workflows


def _read_rows(path: str | Path) -> list[_Row]:
    reader = csv.reader(io.StringIO(read_text(path)))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        raise input_error(path, 1, f"not an Alibaba batch_task CSV: the header must be {','.join(HEADER)}")
    rows = []
    for fields in reader:
        if fields and any(f.strip() for f in fields):
            row = _parse_row(path, reader.line_num, fields)
            if row is not None:
                rows.append(row)
    return rows


def _parse_row(path: str | Path, line: int, fields: list[str]) -> _Row | None:
    if len(fields) != len(HEADER):
        warn(path, line, f"expected {len(HEADER)} fields, found {len(fields)}; row skipped")
        return None
    record = dict(zip(HEADER, (f.strip() for f in fields), strict=True))
    parsed = _parse_name(record["task_name"])
    if parsed is None:
        warn(path, line, f"malformed task name {record['task_name']!r} (expected e.g. M5_3_4 or task_<id>); "
             "row skipped")
        return None
    try:
        instances = int(float(record["instance_num"]))
        runtime_s = _runtime_s(record)
    except (ValueError, OverflowError):
        warn(path, line, "instance_num, start_time, end_time and field7 must be numbers; row skipped")
        return None
    if instances < 1 or not record["job_name"]:
        warn(path, line, "a task needs a job_name and instance_num >= 1; row skipped")
        return None
    stage_id, number, deps = parsed
    return _Row(line, record["job_name"], record["task_name"], stage_id, number, deps, instances, runtime_s)


def _parse_name(name: str) -> tuple[str, int | None, tuple[int, ...]] | None:
    """(stage id, task number, numbers of the tasks it depends on), or None for a malformed name."""
    if m := _DAG_NAME.fullmatch(name):
        return f"{m.group(1)}{m.group(2)}", int(m.group(2)), tuple(int(d) for d in m.group(3).split("_")[1:])
    if _INDEPENDENT_NAME.fullmatch(name):
        return name, None, ()
    return None


def _runtime_s(record: Mapping[str, str]) -> float:
    """field7 (mean duration of one instance); end - start when it is missing or not positive."""
    mean_s = float(record["field7"]) if record["field7"] else math.nan
    if math.isfinite(mean_s) and mean_s > 0:
        return mean_s
    return max(0.0, float(record["end_time"]) - float(record["start_time"]))


def _job_tasks(path: str | Path, job: str, rows: list[_Row]) -> list[Task]:
    kept: list[_Row] = []
    by_number: dict[int, str] = {}
    seen_ids: set[str] = set()
    for row in rows:
        if row.stage_id in seen_ids or row.number in by_number:
            warn(path, row.line, f"job {job}: task {row.name!r} repeats task number or name of an earlier row; "
                 "row skipped")
            continue
        kept.append(row)
        seen_ids.add(row.stage_id)
        if row.number is not None:
            by_number[row.number] = row.stage_id
    tasks = []
    for row in kept:
        parents = []
        for dep in row.deps:
            if dep in by_number and dep != row.number:
                parents.append(by_number[dep])
            else:
                warn(path, row.line, f"job {job}: task {row.name!r} depends on task {dep}, which the job does "
                     "not have (or is itself); edge dropped")
        # Each task is its own type: the letter carries no meaning (see the package docstring).
        tasks.append(Task(row.stage_id, row.stage_id, tuple(dict.fromkeys(parents)), row.runtime_s,
                          min(row.instances, MAX_FANOUT_REQUESTS)))
    return tasks
