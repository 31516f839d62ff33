"""LMCache agent traces (JSONL of `{timestamp, input, output, session_id}`, one LLM call per line) -> one chain
workflow per session, whose context grows call by call.

The rule, in the order it is applied:
1. Calls are grouped by `session_id` (a file may hold several sessions; a session may span files of one load)
   and ordered by `timestamp` (microseconds; ties by file and line). A session's stages are `call0`, `call1`, ...
2. Model: one per session, drawn like an Alibaba task's (common.models_by_type with the session as its only
   type, weight params_b ** -0.75) from `rng_for(rng_seed, <file of the session's first call>, session_id)`.
3. Call k's prompt: `call0` reads `TextPart(stable_key("lmcache", session, 0), n)`; every later call continues
   the previous call (`continues` and the only parent): `(ContextPart(call k-1, 0), TextPart(key k, n))`. n =
   estimate_tokens of the call's new input: its input text after the longest prefix it shares with the input of
   any earlier call of the session (the earlier text is already in the continued context). tau-bench interleaves
   the agent's and the simulated user's calls in one session, so the call before is not always the one whose text
   a call extends; the chain still carries both, which makes late contexts somewhat longer than either side's.
4. Expected output tokens = estimate_tokens(output) (an empty output, e.g. a tool call whose arguments the trace
   does not record, counts as 1 token); max_tokens = 2 x expected.
5. Workflow id = name = the session id; arrival = seconds from the earliest call of everything loaded together
   to the session's first call; source = the file of that call.
The trace has no token counts and no system prompts or tool results, so contexts are shorter than the agent's
real ones (estimate_tokens: 4 characters per token).

A line that is not such a record warns (TraceWarning, FILE:LINE) and is skipped; an unreadable file, invalid JSON,
or a named file that is empty or whose first record is not a call raises InputError (in a folder, such files are
ignored, empty ones with a warning).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fate_ray.traces.common import input_error, iter_jsonl, models_by_type, rng_for, trace_files, warn
from fate_ray.workload import ContextPart, Stage, TextPart, Workflow, estimate_tokens, stable_key

FIELDS = ("timestamp", "input", "output", "session_id")
US_PER_S = 1_000_000


@dataclass(frozen=True, slots=True)
class _Call:
    timestamp_us: float
    path: str
    line: int
    input: str
    output: str


def is_lmcache_record(record: Any) -> bool:
    return (isinstance(record, dict) and all(f in record for f in FIELDS)
            and isinstance(record["timestamp"], (int, float)) and not isinstance(record["timestamp"], bool)
            and math.isfinite(record["timestamp"])
            and all(isinstance(record[f], str) for f in ("input", "output", "session_id"))
            and record["session_id"] != "")


def load_lmcache(paths: str | Path | Iterable[str | Path], rng_seed: object,
                 catalog_models: Mapping[str, float]) -> list[Workflow]:
    """Sessions of the given files and folders (folders: every `*.jsonl` below, in sorted path order, whose first
    record is an LMCache call; others are ignored, empty ones warn), in order of arrival."""
    sessions: dict[str, list[_Call]] = {}
    for file, named in trace_files(paths, "*.jsonl"):
        _read(file, sessions, named)
    start_us = min((c.timestamp_us for calls in sessions.values() for c in calls), default=0.0)
    workflows = [_session_workflow(sid, calls, start_us, rng_seed, catalog_models) for sid, calls in sessions.items()]
    return sorted(workflows, key=lambda w: (w.arrival_s, w.workflow_id))


def _read(path: Path, sessions: dict[str, list[_Call]], named: bool) -> None:
    with contextlib.closing(iter_jsonl(path)) as records:
        _read_records(path, records, sessions, named)


def _read_records(path: Path, records, sessions: dict[str, list[_Call]], named: bool) -> None:
    first = next(records, None)
    if first is None:
        if named:
            raise input_error(path, 1, "the file holds no LMCache agent call")
        warn(path, 1, "empty file; skipped")
        return
    if not is_lmcache_record(first[1]):
        if named:
            raise input_error(path, first[0], "not an LMCache agent trace: expected {timestamp, input, output, "
                              "session_id} with a number and three strings")
        return
    kept = 0
    for line, record in itertools.chain([first], records):
        if not is_lmcache_record(record):
            warn(path, line, "not an LMCache agent call (expected {timestamp, input, output, session_id} with a "
                 "number and three strings); row skipped")
            continue
        sessions.setdefault(record["session_id"], []).append(
            _Call(float(record["timestamp"]), str(path), line, record["input"], record["output"]))
        kept += 1
    if named and not kept:
        raise input_error(path, 1, "the file holds no usable LMCache agent call")


def _session_workflow(session_id: str, calls: list[_Call], start_us: float, rng_seed: object,
                      catalog_models: Mapping[str, float]) -> Workflow:
    calls = sorted(calls, key=lambda c: (c.timestamp_us, c.path, c.line))
    first = calls[0]
    model = models_by_type({session_id: 1}, rng_for(rng_seed, first.path, session_id), catalog_models)[session_id]
    stages: dict[str, Stage] = {}
    earlier: list[str] = []
    for k, call in enumerate(calls):
        shared = max((len(os.path.commonprefix([call.input, e])) for e in earlier), default=0)
        own = TextPart(stable_key("lmcache", session_id, k), estimate_tokens(call.input[shared:]))
        expected = estimate_tokens(call.output)
        previous = f"call{k - 1}" if k else None
        prompt = (ContextPart(previous, 0), own) if previous else (own,)
        stages[f"call{k}"] = Stage(stage_id=f"call{k}", model=model, parents=(previous,) if previous else (),
                                   num_requests=1, prompts=(prompt,), expected_output_tokens=expected,
                                   max_tokens=2 * expected, shardable=False, continues=previous)
        earlier.append(call.input)
    return Workflow(session_id, session_id, (first.timestamp_us - start_us) / US_PER_S, stages, tuple(stages), {}, first.path)
