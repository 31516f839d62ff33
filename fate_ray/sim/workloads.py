"""Synthetic LLM workflow DAGs with a controlled prefix-sharing ratio (the `prefix-reuse` benchmark).

`sharing` is the fraction of each request's fixed prompt that is a prefix shared with other requests: the same
system prompt / round context, keyed so that every workflow of one benchmark instance shares it (as the requests of
one service do). The rest of the prompt is unique to the request. Shapes:

- `map_reduce`: map over 16 chunks (small model) -> reduce over all outputs (8B).
- `chain`: 5 turns, each continuing the previous turn's conversation (8B); only the first turn has fixed text.
- `fan_out_in`: a planner (3B) -> 8 parallel experts on three models -> a judge (14B) reading all of them.
- `agent_rounds`: 3 rounds x 4 agents (8B); an agent continues its own previous turn and reads the round's shared
  context; a summariser (3B) closes each round.
"""

from __future__ import annotations

import random
from typing import Literal

from fate_ray.workload import ContextPart, OutputPart, Part, Stage, TextPart, Workflow, stable_key

Shape = Literal["map_reduce", "chain", "fan_out_in", "agent_rounds"]
SHAPES: tuple[Shape, ...] = ("map_reduce", "chain", "fan_out_in", "agent_rounds")
SHARING_RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)
PROMPT_TOKENS = 2048  # fixed prompt per request before sharing splits it (EST: a RAG/agent prompt with context)


class _Builder:
    def __init__(self, name: str, group: str, sharing: float, rng: random.Random):
        self.name, self.group, self.sharing, self.rng = name, group, sharing, rng
        self.stages: dict[str, Stage] = {}

    def fixed(self, label: str, index: int, tokens: int = PROMPT_TOKENS) -> list[Part]:
        """A request's fixed prompt: a shared prefix of `sharing x tokens`, then unique text."""
        shared = int(round(self.sharing * tokens))
        parts: list[Part] = []
        if shared:
            parts.append(TextPart(stable_key("shared", self.group, label), shared))
        if tokens - shared:
            parts.append(TextPart(stable_key("unique", self.name, label, index), tokens - shared))
        return parts

    def add(self, sid: str, model: str, parents: tuple[str, ...], prompts: list[list[Part]], out_tokens: int,
            continues: str | None = None) -> None:
        jitter = self.rng.uniform(0.8, 1.2)
        expected = max(8, int(out_tokens * jitter))
        self.stages[sid] = Stage(sid, model, parents, len(prompts), tuple(tuple(p) for p in prompts), expected,
                                 expected * 2, len(prompts) > 1, continues)

    def build(self) -> Workflow:
        return Workflow(self.name, self.name, 0.0, dict(self.stages), tuple(self.stages), source="synthetic")


def make_workflow(shape: Shape, sharing: float, group: str, index: int, seed: int = 0) -> Workflow:
    """One workflow of `shape`; workflows with the same `group` share their prefixes."""
    name = f"{shape}-s{sharing:g}-{index}"
    b = _Builder(name, group, sharing, random.Random(stable_key("workload", seed, name)))
    if shape == "map_reduce":
        b.add("map", "qwen2.5-1.5b", (), [b.fixed("map", i) for i in range(16)], 128)
        b.add("reduce", "llama3.1-8b", ("map",), [[*b.fixed("reduce", 0, 512), OutputPart("map", None)]], 256)
    elif shape == "chain":
        b.add("turn0", "llama3.1-8b", (), [b.fixed("turn", 0)], 192)
        for t in range(1, 5):
            b.add(f"turn{t}", "llama3.1-8b", (f"turn{t-1}",),
                  [[ContextPart(f"turn{t-1}", 0), TextPart(stable_key("ask", name, t), 64)]], 192, f"turn{t-1}")
    elif shape == "fan_out_in":
        b.add("plan", "qwen2.5-3b", (), [b.fixed("plan", 0)], 256)
        experts = ("qwen2.5-1.5b", "llama3.1-8b", "qwen2.5-3b")
        for k in range(8):
            b.add(f"expert{k}", experts[k % 3], ("plan",), [[*b.fixed("expert", k), OutputPart("plan", 0)]], 192)
        b.add("judge", "qwen2.5-14b", tuple(f"expert{k}" for k in range(8)),
              [[*b.fixed("judge", 0, 512), *(OutputPart(f"expert{k}", 0) for k in range(8))]], 256)
    elif shape == "agent_rounds":
        prev = None
        for r in range(3):
            parents = (f"summary{r-1}",) if r else ()
            ctx = [OutputPart(prev, 0)] if prev else []
            prompts = []
            for a in range(4):
                head = [ContextPart(f"agent{r-1}", a)] if r else []
                prompts.append([*head, *b.fixed(f"round{r}", a, PROMPT_TOKENS // (r + 1)), *ctx])
            agent_parents = parents + ((f"agent{r-1}",) if r else ())
            b.add(f"agent{r}", "llama3.1-8b", agent_parents, prompts, 160, f"agent{r-1}" if r else None)
            b.add(f"summary{r}", "qwen2.5-3b", (f"agent{r}",), [[*b.fixed("summary", r, 256),
                                                                   OutputPart(f"agent{r}", None)]], 128)
            prev = f"summary{r}"
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return b.build()
