"""Prompt templates: jinja2's sandbox, checked statically so that unsafe templates fail validation, not a run.

Variables a template may use: `inputs` (the workflow's inputs), `item` and `index` (in a `map` stage: the current
element and its position), `sample` (in a `repeat` stage), and `<parent>.outputs` (list of strings) or
`<parent>.output` (all outputs joined by newlines) for any parent listed in `after` or `continues`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from jinja2 import TemplateError, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

LOOP_VARIABLES = frozenset({"item", "index", "sample"})

MAX_REPEAT = 100_000  # `'x' * n` and `n ** k` beyond this are refused: a template must not exhaust memory


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*" and any(isinstance(x, int) and abs(x) > MAX_REPEAT for x in (left, right)) \
                and any(isinstance(x, (str, list, tuple)) for x in (left, right)):
            raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


_ENV = _BoundedSandbox(autoescape=False, keep_trailing_newline=True)


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
    except TemplateError as exc:
        raise ValueError(f"template does not parse: {exc.message}") from None
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
    """Render in the immutable sandbox; a sandbox violation becomes ValueError with one line."""
    try:
        return _ENV.from_string(source).render(**context)
    except SecurityError as exc:
        raise ValueError(f"template blocked by the sandbox: {exc}") from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        raise ValueError(f"template failed to render: {exc.__class__.__name__}: {exc}") from None
