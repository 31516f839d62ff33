"""Parrot MetaGPT JSONL (one round of calls per line) -> one Workflow, a stage per round.

Sizes come from the traced OpenAI `usage`: a request's expected prompt (inherited tokens plus its own parts)
equals its traced `prompt_tokens`.
- A call of file f continues f's call of the round before when there is one: (ContextPart(that call), own
  text of prompt_tokens - that call's prompt and completion tokens, at least 1).
- Other calls: (round prefix, OutputPart(previous round, None), own text). The round prefix is the common
  prefix of the round's prompts (system + user_msg; the system prompt for a one-call round) in characters,
  converted to tokens at the call's traced tokens-per-character (GPT-4 gets ~4.5 chars/token on this code, so a
  flat 4 would make the prefix longer than the whole prompt), minus the previous round's output tokens, which
  MetaGPT pastes into that shared context. Its own text is the rest of its prompt_tokens.
"""

from __future__ import annotations

import os
import re
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fate_ray.traces.common import (
    input_error,
    iter_jsonl,
    models_by_type,
    rng_for,
    warn,
)
from fate_ray.workload import CHARS_PER_TOKEN, ContextPart, OutputPart, Part, Stage, TextPart, Workflow, stable_key

_ROUND_KEY = re.compile(r"r(\d+)_queries")


@dataclass(frozen=True, slots=True)
class _Call:
    file: str  # MetaGPT's per-file conversation this call belongs to
    system: str
    prompt: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Round:
    stage_id: str
    calls: tuple[_Call, ...]

    @property
    def role(self) -> str:
        """The round's task type: its most common system prompt, as a short stable name."""
        counts = Counter(c.system for c in self.calls)
        system = min(counts, key=lambda s: (-counts[s], s))
        return f"system-{stable_key(system) % 16**8:08x}"


def _round_number(key: str) -> int:
    return int(_ROUND_KEY.fullmatch(key).group(1))


def is_parrot_record(record: Any) -> bool:
    return isinstance(record, dict) and any(_ROUND_KEY.fullmatch(str(k)) for k in record)


def load_parrot_metagpt(path: str | Path, rng_seed: object, catalog_models: Mapping[str, float]) -> Workflow:
    """Round r+1 after round r; a file's call continues that file's call of the round before when there is one."""
    rounds = _read_rounds(path)
    name = Path(path).stem
    rng = rng_for(rng_seed, path)
    models = models_by_type(Counter(r.role for r in rounds for _ in r.calls), rng, catalog_models)
    stages: dict[str, Stage] = {}
    for index, round_ in enumerate(rounds):
        previous = rounds[index - 1] if index else None
        stages[round_.stage_id] = _round_stage(name, round_, previous, models[round_.role])
    return Workflow(name, name, 0.0, stages, tuple(r.stage_id for r in rounds), {}, str(path))


def _read_rounds(path: str | Path) -> list[_Round]:
    rounds: list[_Round] = []
    for line, record in iter_jsonl(path):
        if not is_parrot_record(record):
            raise input_error(path, line, "not a Parrot MetaGPT round: expected `rK_queries` and `rK_responses` keys")
        for key in sorted((k for k in record if _ROUND_KEY.fullmatch(k)), key=_round_number):
            stage_id = key.removesuffix("_queries")
            if any(r.stage_id == stage_id for r in rounds):
                raise input_error(path, line, f"round {stage_id} appears twice")
            calls = _calls(path, line, record[key], record.get(f"{stage_id}_responses"))
            if calls:
                rounds.append(_Round(stage_id, calls))
            else:
                warn(path, line, f"round {stage_id} has no call with a response; round skipped")
    if not rounds:
        raise input_error(path, 1, "the file holds no Parrot MetaGPT round")
    return rounds


def _calls(path: str | Path, line: int, queries: Any, responses: Any) -> tuple[_Call, ...]:
    if not isinstance(queries, dict) or not isinstance(responses, dict):
        raise input_error(path, line, "`rK_queries` and `rK_responses` must both be mappings of name -> call")
    calls = []
    for file, query in queries.items():
        if file not in responses:
            warn(path, line, f"query {file!r} has no response; call skipped")
            continue
        usage = responses[file].get("usage") if isinstance(responses[file], dict) else None
        tokens = (usage or {}).get("prompt_tokens"), (usage or {}).get("completion_tokens")
        if not isinstance(query, dict) or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise input_error(path, line, f"call {file!r}: needs a {{system, user_msg}} query and a response whose "
                             "`usage` has integer prompt_tokens and completion_tokens")
        system = str(query.get("system", ""))
        calls.append(_Call(file, system, system + str(query.get("user_msg", "")), tokens[0], tokens[1]))
    return tuple(calls)


def _round_stage(workflow: str, round_: _Round, previous: _Round | None, model: str) -> Stage:
    earlier = {c.file: i for i, c in enumerate(previous.calls)} if previous else {}
    inherited_tokens = sum(c.completion_tokens for c in previous.calls) if previous else 0
    fresh = [c for c in round_.calls if c.file not in earlier]
    prefix_tokens = _shared_prefix_tokens(round_.calls, fresh, inherited_tokens)
    prompts: list[tuple[Part, ...]] = []
    for call in round_.calls:
        own_key = stable_key("parrot-call", workflow, round_.stage_id, call.file)
        if previous is not None and call.file in earlier:
            before = previous.calls[earlier[call.file]]
            # The continued context (prompt + answer of the round before) stands for that much of this prompt.
            own_tokens = max(1, call.prompt_tokens - before.prompt_tokens - before.completion_tokens)
            prompts.append((ContextPart(previous.stage_id, earlier[call.file]), TextPart(own_key, own_tokens)))
            continue
        parts: list[Part] = []
        if prefix_tokens:
            parts.append(TextPart(stable_key("parrot-prefix", workflow, round_.stage_id), prefix_tokens))
        if previous is not None:
            parts.append(OutputPart(previous.stage_id, None))
        own_tokens = max(1, call.prompt_tokens - prefix_tokens - inherited_tokens)
        prompts.append((*parts, TextPart(own_key, own_tokens)))
    completions = [c.completion_tokens for c in round_.calls]
    expected = max(1, round(statistics.mean(completions)))
    return Stage(stage_id=round_.stage_id, model=model, parents=(previous.stage_id,) if previous else (),
                 num_requests=len(prompts), prompts=tuple(prompts), expected_output_tokens=expected,
                 max_tokens=max(2 * expected, *completions), shardable=len(prompts) > 1,
                 continues=previous.stage_id if previous and len(fresh) < len(round_.calls) else None)


def _shared_prefix_tokens(calls: tuple[_Call, ...], fresh: list[_Call], inherited_tokens: int) -> int:
    """The round's common prefix in tokens, less the inherited outputs it contains; <= every fresh call's room."""
    prefix_chars = len(os.path.commonprefix([c.prompt for c in calls])) if len(calls) > 1 else len(calls[0].system)
    sizes = [_tokens_of_chars(prefix_chars, c) - inherited_tokens for c in fresh]
    room = [c.prompt_tokens - inherited_tokens - 1 for c in fresh]
    return max(0, min(sizes + room, default=0))


def _tokens_of_chars(chars: int, call: _Call) -> int:
    """`chars` of `call`'s prompt in tokens at its traced ratio (CHARS_PER_TOKEN if the prompt text is empty)."""
    if not call.prompt:
        return chars // CHARS_PER_TOKEN
    return round(chars * call.prompt_tokens / len(call.prompt))
