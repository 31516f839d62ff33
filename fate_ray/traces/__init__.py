"""Real DAG traces -> `Workflow`s: WfCommons WfFormat 1.5 JSON, Alibaba v2018 `batch_task` CSV and Parrot
MetaGPT JSONL (`load_dags` finds them in files and folders), plus Mooncake request traces (`load_mooncake`) and
LMCache agent sessions (`load_lmcache`, one chain per session; its rule is in lmcache.py).

Nobody ran these DAGs on LLMs, so a task becomes an LLM stage by the rule below. It is seeded and
deterministic: every draw comes, in the order written here, from one `random.Random(stable_key(rng_seed,
<file name>))` per file (per file and job for Alibaba), never from the global RNG or `hash()`.

1. Model per task type. A WfFormat task's type is its `command.program` when that is one word (a program),
   else its name without a trailing `_ID<digits>` or `_<digits>` (Nextflow puts a whole script in
   `program`). An Alibaba task is its own type: the letter of `M5_3_4` carries no meaning, so each task draws
   its own model. The types of a workflow, most tasks first (ties by name), each draw a model from
   `catalog_models` (name -> params_b of the models that fit at least one device, see `catalog_models_of`)
   with weight params_b ** -0.75; for the shipped catalog: 1.5B 46%, 3B 27%, 8B 13%, 14.7B 8%, 32.8B 5%.
2. System prefix per type, same order: `TextPart(stable_key("sysprompt", workflow, type), n)`, n uniform
   in 256..2048 tokens, shared by all tasks (and instances) of the type.
3. Then each task in topological order (ties by trace order), with L = 1 + log2(1 + runtime_s):
   a. a task with exactly one parent continues it (`continues=parent`) with probability 0.3;
   b. expected output tokens = clamp(32 L x U(0.8, 1.2), 16, 1024); max_tokens = 2 x expected;
   c. per request j, its own text: `TextPart(stable_key("task", workflow, task_id), n)` (key also gets j when
      the stage has several requests), n = clamp(256 L x U(0.8, 1.2), 128, 8192) tokens; prompt =
      (ContextPart(parent, j mod parent's requests), own text) for a continuing task (no system prefix: the
      parent's context has one), else (system prefix, one OutputPart per parent for the first 4 parents in
      trace order, own text): OutputPart(p, j) when p has as many requests as the task (a map after a map),
      else OutputPart(p, None), all of p's outputs. Every parent stays in `parents`; the cap only bounds prompt length.
   runtime_s: WfFormat `runtimeInSeconds` (0 if absent); Alibaba `field7`, the mean instance duration
   (end - start if not positive).
4. Requests per stage: 1 per WfFormat task; Alibaba `instance_num` capped at 64 (it reaches 14,669).
   shardable = more than one request. Workflow id = name = the file stem (WfFormat, Parrot) or job name
   (Alibaba); arrival 0 s; source = the file path.

Parrot MetaGPT is a real LLM run: rule 1 picks its models (a round's type is its system prompt), its sizes
come from the traced token usage (see parrot.py). Mooncake requests use one given model (see mooncake.py).

Skipped rows, requests and edges raise `TraceWarning`s starting FILE:LINE; a file that cannot be used at all
raises `InputError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from fate_ray.traces.alibaba import has_alibaba_header, load_alibaba
from fate_ray.traces.common import (
    TraceWarning,
    catalog_models_of,
    input_error,
    iter_jsonl,
    parse_json,
    read_text,
    trace_files,
)
from fate_ray.traces.lmcache import load_lmcache
from fate_ray.traces.mooncake import load_mooncake
from fate_ray.traces.parrot import is_parrot_record, load_parrot_metagpt
from fate_ray.traces.wfcommons import is_wfformat, load_wfcommons
from fate_ray.workload import Workflow

__all__ = ["TraceWarning", "catalog_models_of", "load_alibaba", "load_dags", "load_lmcache", "load_mooncake",
           "load_parrot_metagpt", "load_wfcommons"]

_EXPECTED = "expected a WfFormat .json, an Alibaba batch_task .csv or a Parrot MetaGPT .jsonl"


def load_dags(paths: str | Path | Iterable[str | Path], rng_seed: object,
              catalog_models: Mapping[str, float]) -> list[Workflow]:
    """Workflows of the given files and folders (searched recursively, in sorted path order).

    In a folder, a `.json` with a top-level `workflow` mapping, a `.csv` with the Alibaba header and a `.jsonl`
    whose first record has `rK_queries` keys are loaded; other files (Mooncake or LMCache `.jsonl`, chat logs)
    are ignored. A named file must be one of the three. Missing paths and unparseable files raise InputError.
    """
    workflows: list[Workflow] = []
    for file, named in trace_files(paths):
        kind = _kind(file)
        if kind is not None:
            workflows += _load(kind, file, rng_seed, catalog_models)
        elif named:
            raise input_error(file, 1, f"not a trace this importer knows: {_EXPECTED}")
    return workflows


def _kind(path: Path) -> str | None:
    """The trace format of `path` from its extension and first record, or None (InputError if unreadable)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "wfcommons" if is_wfformat(parse_json(read_text(path), path)) else None
    if suffix == ".csv":
        return "alibaba" if has_alibaba_header(_first_line(path)) else None
    if suffix == ".jsonl":
        with contextlib.closing(iter_jsonl(path)) as records:
            first = next(records, None)
        return "parrot" if first is not None and is_parrot_record(first[1]) else None
    return None


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as lines:
            return lines.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise input_error(path, 1, f"cannot read the file ({exc.__class__.__name__}: {exc})") from None


def _load(kind: str, path: Path, rng_seed: object, catalog_models: Mapping[str, float]) -> list[Workflow]:
    if kind == "wfcommons":
        return [load_wfcommons(path, rng_seed, catalog_models)]
    if kind == "alibaba":
        return load_alibaba(path, rng_seed, catalog_models)
    return [load_parrot_metagpt(path, rng_seed, catalog_models)]
