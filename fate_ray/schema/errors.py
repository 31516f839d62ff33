"""Input errors a user can cause (bad YAML, unknown names, missing files), each rendered as one line: `error: FILE:LINE: message`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"error: {self.file}:{self.line}: {self.message}"


class InputError(Exception):
    """One or more problems with a workflow or cluster file; `str()` is one line per problem."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else a list of what is known."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
    return f" (known: {shown})" if known else ""
