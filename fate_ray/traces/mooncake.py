"""Mooncake request trace JSONL -> one single-request workflow per line, arriving at the traced time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fate_ray.traces.common import input_error, iter_jsonl, warn
from fate_ray.workload import Stage, TextPart, Workflow, stable_key

BLOCK_TOKENS = 512  # Mooncake's hash_ids name 512-token prefix blocks
_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def load_mooncake(path: str | Path, limit: int | None = None, time_scale: float = 1.0,
                  model: str = "llama3.1-8b") -> list[Workflow]:
    """The first `limit` requests (all if None); arrival = timestamp_ms / 1000 * time_scale seconds.

    Equal hash ids become equal TextPart keys, so repeated prefixes hit the prefix cache as they did in Mooncake.
    """
    workflows: list[Workflow] = []
    for line, record in iter_jsonl(path):
        if limit is not None and len(workflows) >= limit:
            break
        workflow = _request_workflow(path, line, record, time_scale, model)
        if workflow is not None:
            workflows.append(workflow)
    return workflows


def _request_workflow(path: str | Path, line: int, record: Any, time_scale: float, model: str) -> Workflow | None:
    if not _well_formed(record):
        raise input_error(path, line, "not a Mooncake request: expected {timestamp, input_length, output_length, "
                         "hash_ids} with numbers and a list of integer block ids")
    hash_ids, input_tokens = record["hash_ids"], record["input_length"]
    last_block_tokens = input_tokens - BLOCK_TOKENS * (len(hash_ids) - 1)
    if not hash_ids or not 0 < last_block_tokens <= BLOCK_TOKENS:
        warn(path, line, f"input_length {input_tokens} does not fit {len(hash_ids)} blocks of {BLOCK_TOKENS} "
             "tokens; request skipped")
        return None
    sizes = [BLOCK_TOKENS] * (len(hash_ids) - 1) + [last_block_tokens]
    prompt = tuple(TextPart(stable_key("mooncake", h), tokens) for h, tokens in zip(hash_ids, sizes, strict=True))
    output_tokens = max(1, record["output_length"])  # engines need max_tokens >= 1
    stage = Stage(stage_id="request", model=model, parents=(), num_requests=1, prompts=(prompt,),
                  expected_output_tokens=output_tokens, max_tokens=output_tokens, shardable=False)
    name = Path(path).stem
    arrival_s = record["timestamp"] / 1000 * time_scale
    return Workflow(f"{name}-{line}", name, arrival_s, {"request": stage}, ("request",), {}, f"{path}:{line}")


def _well_formed(record: Any) -> bool:
    if not isinstance(record, dict) or any(f not in record for f in _FIELDS):
        return False
    numbers_ok = isinstance(record["timestamp"], (int, float)) and all(
        isinstance(record[f], int) and record[f] >= 0 for f in ("input_length", "output_length"))
    return numbers_ok and isinstance(record["hash_ids"], list) and all(isinstance(h, int) for h in record["hash_ids"])
