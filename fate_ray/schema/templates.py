"""Prompt templates: jinja2's sandbox, checked statically so that unsafe templates fail validation, not a run.

Variables a template may use: `inputs` (the workflow's inputs), `item` and `index` (in a `map` stage: the current
element and its position), `sample` (in a `repeat` stage), and `<parent>.outputs` (list of strings) or
`<parent>.output` (all outputs joined by newlines) for any parent listed in `after` or `continues`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

LOOP_VARIABLES = frozenset({"item", "index", "sample"})

# Templates are user input: besides the sandbox's rules (no attributes starting with "_", no unsafe callables),
# refuse what would exhaust memory or time at validation.
MAX_TEXT_CHARS = 1_000_000  # a rendered prompt, or a string/list built by `*`
MAX_RENDER_S = 2.0
MAX_LOOP_RANGE = 10_000
# Methods and filters whose width argument can build a huge string in one call.
_WIDTH_METHODS = frozenset({"format", "format_map", "center", "ljust", "rjust", "zfill", "expandtabs"})
_WIDTH_FILTERS = ("center", "format", "indent", "wordwrap", "filesizeformat")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*":
            seq, times = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_TEXT_CHARS:
                raise SecurityError("repetition builds more than a million elements")
        return super().call_binop(context, operator, left, right)

    def is_safe_attribute(self, obj, attr, value):
        return attr not in _WIDTH_METHODS and super().is_safe_attribute(obj, attr, value)


_ENV = _BoundedSandbox(autoescape=False, keep_trailing_newline=True)
for _name in _WIDTH_FILTERS:
    _ENV.filters.pop(_name, None)
_ENV.globals["range"] = lambda *args: _bounded_range(*args)


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_LOOP_RANGE:
        raise SecurityError(f"range of {len(r)} items; templates may loop at most {MAX_LOOP_RANGE} times")
    return r


@dataclass(frozen=True, slots=True)
class TemplateInfo:
    """What a template reaches for: top-level names, `inputs.<key>` keys and parent `.attr` uses."""

    names: frozenset[str]
    input_keys: frozenset[str]
    attrs_of: Mapping[str, frozenset[str]]


def inspect_template(source: str) -> TemplateInfo:
    """Parse `source`; raise ValueError with a one-line reason if it is malformed or reaches for internals."""
    try:
        ast = _ENV.parse(source)
        _ENV.compile(ast)  # deep nesting fails here (RecursionError, SyntaxError), not at run time
    except TemplateError as exc:
        raise ValueError(f"template does not parse: {exc.message}") from None
    except (RecursionError, SyntaxError, MemoryError) as exc:
        raise ValueError(f"template is nested too deeply to compile ({exc.__class__.__name__})") from None
    attrs: dict[str, set[str]] = {}
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        attr = node.attr if isinstance(node, nodes.Getattr) else _const_str(node.arg)
        if attr is not None and (attr.startswith("_") or not _ENV.is_safe_attribute(object(), attr, None)):
            raise ValueError(f"template reaches for Python internals ({attr!r}); use only data fields")
        if isinstance(node.node, nodes.Name) and attr is not None:
            attrs.setdefault(node.node.name, set()).add(attr)
    for node in ast.find_all(nodes.Name):
        if node.name.startswith("_"):
            raise ValueError(f"template reaches for Python internals ({node.name!r}); use only data fields")
    names = frozenset(meta.find_undeclared_variables(ast))
    return TemplateInfo(names, frozenset(attrs.get("inputs", ())), {k: frozenset(v) for k, v in attrs.items()})


def _const_str(arg: nodes.Node) -> str | None:
    return arg.value if isinstance(arg, nodes.Const) and isinstance(arg.value, str) else None


class ParentOutputs:
    """What a template sees as `<parent>`: `.outputs` (list) and `.output` (joined)."""

    __slots__ = ("outputs",)

    def __init__(self, outputs: list[str]):
        self.outputs = list(outputs)

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render in the bounded sandbox; any failure becomes ValueError with one line.

    NOTE: the size and time limits are checked between output chunks, so a loop that emits nothing is only
    bounded by MAX_LOOP_RANGE per `range`.
    """
    deadline = time.monotonic() + MAX_RENDER_S
    chunks: list[str] = []
    size = 0
    try:
        for chunk in _ENV.from_string(source).generate(**context):
            size += len(chunk)
            if size > MAX_TEXT_CHARS:
                raise SecurityError("the rendered prompt exceeds a million characters")
            if time.monotonic() > deadline:
                raise SecurityError(f"rendering took longer than {MAX_RENDER_S:g} s")
            chunks.append(chunk)
    except SecurityError as exc:
        raise ValueError(f"template blocked by the sandbox: {exc}") from None
    except MemoryError:
        raise ValueError("template failed to render: it needs too much memory") from None
    except Exception as exc:  # noqa: BLE001 -- any error of a user's template is a user error, reported in one line
        raise ValueError(f"template failed to render: {exc.__class__.__name__}: {exc}") from None
    return "".join(chunks)
