"""Load YAML while remembering the line of every mapping key and sequence item, so errors can name a line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fate_ray.schema.errors import InputError, Problem

Loc = tuple[str | int, ...]


class LocatedYaml:
    """A parsed YAML document plus `line(loc)` -> 1-based line of the deepest known node on that path."""

    def __init__(self, file: str, data: Any, lines: dict[Loc, int]):
        self.file = file
        self.data = data
        self._lines = lines

    def line(self, loc: Loc) -> int:
        loc = tuple(loc)
        while loc and loc not in self._lines:
            loc = loc[:-1]
        return self._lines.get(loc, 1)

    def problem(self, loc: Loc, message: str) -> Problem:
        return Problem(self.file, self.line(loc), message)

    def problems_from(self, err: ValidationError) -> list[Problem]:
        out = []
        for e in err.errors():
            loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            where = ".".join(str(x) for x in loc)
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown field {loc[-1]!r}; remove it or check its spelling"
            elif e["type"] == "missing":
                msg = f"field {where!r} is required"
            elif where and not msg.startswith(where.split(".")[0]):
                msg = f"{where}: {msg}"
            out.append(self.problem(loc, msg))
        return out


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], duplicates: list[tuple[str, int]],
          walked: set[int]) -> None:
    # An alias is the same node object again: walk each node once, or a self-referencing anchor recurses
    # forever and nested aliases ("billion laughs") take exponential time.
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            sub = loc + (key.value,)
            if key.value in seen:
                # PyYAML silently keeps the last value; a repeated key is almost always a mistake.
                duplicates.append((str(key.value), key.start_mark.line + 1))
            seen.add(key.value)
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines, duplicates, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = loc + (i,)
            lines[sub] = item.start_mark.line + 1
            _walk(item, sub, lines, duplicates, walked)


def load_located(path: str | Path) -> LocatedYaml:
    """Read and parse a YAML file; unreadable or malformed files raise InputError naming the line."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([Problem(file, 1, f"cannot read file: {exc.__class__.__name__}: {exc}")]) from None
    return parse_located(text, file)


def parse_located(text: str, file: str) -> LocatedYaml:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError([Problem(file, line, f"malformed YAML: {what}; fix the syntax at this line")]) from None
    except RecursionError:
        raise InputError([Problem(file, 1, "malformed YAML: nesting too deep")]) from None
    lines: dict[Loc, int] = {}
    duplicates: list[tuple[str, int]] = []
    if node is not None:
        _walk(node, (), lines, duplicates, set())
    if duplicates:
        raise InputError([Problem(file, line, f"key {key!r} appears twice in one mapping; keep one")
                         for key, line in duplicates])
    return LocatedYaml(file, data, lines)
