"""Whatever a user does to a workflow file, validation answers with success or one `error: FILE:LINE: message` line
per problem: never a traceback, never another exception, never a hang.

A hypothesis property test mutates the shipped examples (deleted, duplicated and re-indented lines, numbers
changed to 0/-1/huge/strings, stage ids and model names replaced, random characters, truncation); directed cases
cover what random edits rarely reach (templates that fail on a later item, YAML aliases, absurd sizes, templates
Jinja cannot run); then the CLI does the same on a handful of files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fate_ray.schema.errors import InputError
from fate_ray.schema.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = sorted((ROOT / "workflows").glob("*.yaml"))
MIXED_CLUSTER_FILE = ROOT / "workflows" / "clusters" / "mixed-h100-l4.yaml"

ERROR_LINE = re.compile(r"^error: .+:\d+: .+$")
EXAMPLES = {path.name: path.read_text(encoding="utf-8") for path in EXAMPLE_FILES}


def _names(text: str) -> list[str]:
    doc = yaml.safe_load(text)
    return sorted({s["id"] for s in doc["stages"]} | {s["model"] for s in doc["stages"]})


NAMES = {name: _names(text) for name, text in EXAMPLES.items()}
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
NUMBER_VALUES = ["0", "-1", "1", "2.5", "99999999999999999999", "1e999", "abc", '"12"', "true", "null", "[]", "{}", ""]
NAME_CHARS = "abcxyz_-.019 :'\"{}#"
JUNK = "az09_:{}[]-#&*!|>'\",?%@`~\\ \t\n\r\x00\x07\u00e9\u2192\u2028\ufeff"


def _delete_line(draw, text):
    lines = text.splitlines(keepends=True)
    del lines[draw(st.integers(0, len(lines) - 1))]
    return "".join(lines)


def _duplicate_line(draw, text):
    lines = text.splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    return "".join(lines[: i + 1] + lines[i:])


def _change_number(draw, text):
    matches = list(NUMBER.finditer(text))
    m = draw(st.sampled_from(matches))
    return text[: m.start()] + draw(st.sampled_from(NUMBER_VALUES)) + text[m.end() :]


def _rename(draw, text, file):
    spots_of = {name: list(re.finditer(rf"(?<![\w\-]){re.escape(name)}(?![\w\-])", text)) for name in NAMES[file]}
    present = [name for name, spots in spots_of.items() if spots]
    if not present:
        return text
    spots = spots_of[draw(st.sampled_from(present))]
    new = draw(st.text(NAME_CHARS, max_size=12))
    if draw(st.booleans()):
        spots = [draw(st.sampled_from(spots))]
    for m in reversed(spots):
        text = text[: m.start()] + new + text[m.end() :]
    return text


def _reindent(draw, text):
    lines = text.splitlines(keepends=True)
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = draw(st.sampled_from(["", " ", "  ", "   ", "    ", "\t", "        "])) + lines[i].lstrip(" ")
    return "".join(lines)


def _insert_junk(draw, text):
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.text(JUNK, min_size=1, max_size=6)) + text[at:]


def _truncate(draw, text):
    return text[: draw(st.integers(0, len(text)))]


MUTATIONS = ["delete", "duplicate", "number", "rename", "reindent", "junk", "truncate"]


@st.composite
def mutated_examples(draw) -> str:
    file = draw(st.sampled_from(sorted(EXAMPLES)))
    text = EXAMPLES[file]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        if not text.strip() and kind != "junk":
            continue
        if kind == "delete":
            text = _delete_line(draw, text)
        elif kind == "duplicate":
            text = _duplicate_line(draw, text)
        elif kind == "number" and NUMBER.search(text):
            text = _change_number(draw, text)
        elif kind == "rename":
            text = _rename(draw, text, file)
        elif kind == "reindent":
            text = _reindent(draw, text)
        elif kind == "junk":
            text = _insert_junk(draw, text)
        elif kind == "truncate":
            text = _truncate(draw, text)
    return text


def assert_one_line_per_problem(exc: InputError) -> None:
    lines = str(exc).splitlines()
    assert lines, "a InputError without a problem"
    bad = [line for line in lines if not ERROR_LINE.match(line)]
    assert not bad, f"lines not of the form 'error: FILE:LINE: message': {bad!r}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mutants")


def load_or_explain(path, cluster) -> None:
    try:
        load_workflow(path, cluster)
    except InputError as exc:
        assert_one_line_per_problem(exc)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=mutated_examples())
def test_a_mutated_workflow_loads_or_fails_with_one_clear_line_per_problem(workdir, mixed_cluster, text):
    path = workdir / "mutant.yaml"
    path.write_text(text, encoding="utf-8")
    load_or_explain(path, mixed_cluster)


def test_the_unmutated_examples_load(mixed_cluster):
    for path in EXAMPLE_FILES:
        load_workflow(path, mixed_cluster)


# ---------------------------------------------------------------------------------------------------------------
# Directed cases the random mutations are unlikely to hit

LATER_ITEM_FAILS = """\
name: later-item
inputs:
  docs:
    - {title: first, text: "some text"}
    - {title: second}
stages:
  - id: read
    model: qwen2.5-1.5b
    map: inputs.docs
    prompt:
      template: "{{ item.text.strip() }}"
    max_tokens: 16
"""


def test_a_template_that_fails_on_a_later_map_item_is_a_spec_error(tmp_path, mixed_cluster):
    path = tmp_path / "later_item.yaml"
    path.write_text(LATER_ITEM_FAILS, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_workflow(path, mixed_cluster)
    assert_one_line_per_problem(err.value)


RECURSIVE_ANCHOR = """\
name: self-reference
inputs:
  loop: &loop [*loop]
stages:
  - id: s
    model: qwen2.5-1.5b
    prompt: {template: hi}
    max_tokens: 8
"""


def test_a_self_referencing_anchor_loads_or_fails_with_one_line(tmp_path, mixed_cluster):
    path = tmp_path / "anchor.yaml"
    path.write_text(RECURSIVE_ANCHOR, encoding="utf-8")
    load_or_explain(path, mixed_cluster)


def validate_in_subprocess(path, timeout_s: float = 10) -> str:
    """'ok', 'spec error' or the failure, for inputs that could hang or exhaust memory if a guard regressed."""
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fate_ray.schema.cluster import load_cluster
        from fate_ray.schema.errors import InputError
        from fate_ray.schema.workflow import load_workflow
        try:
            load_workflow(sys.argv[1], load_cluster(sys.argv[2]))
        except InputError as exc:
            print(exc)
            sys.exit(3)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script, str(path), str(MIXED_CLUSTER_FILE)], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout_s} s"
    return {0: "ok", 3: "spec error"}.get(done.returncode, f"exit {done.returncode}: {done.stderr[-1000:]}")


def test_an_absurd_repeat_is_refused_quickly(tmp_path):
    path = tmp_path / "huge_repeat.yaml"
    path.write_text(EXAMPLES["self_consistency.yaml"].replace("repeat: 8", "repeat: 1000000000"), encoding="utf-8")
    assert validate_in_subprocess(path) == "spec error"


def test_nested_aliases_do_not_blow_up(tmp_path):
    """A "billion laughs" document: 10 aliases per level, 9 levels, 10^9 paths through 90 nodes."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = EXAMPLES["rag_rerank.yaml"].replace("inputs:\n", "inputs:\n" + "".join(f"  {x}\n" for x in levels), 1)
    path = tmp_path / "laughs.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate_in_subprocess(path) in ("ok", "spec error")


def with_template(template: str) -> str:
    """A one-stage workflow whose template is `template` (JSON-quoted, which YAML reads as is)."""
    return ("name: one-template\ninputs: {xs: [a, b]}\nstages:\n  - id: s\n    model: qwen2.5-1.5b\n"
            f"    prompt:\n      template: {json.dumps(template)}\n    max_tokens: 8\n")


# Templates that parse but that Jinja cannot compile or run: each must be one problem line, not an exception.
UNRUNNABLE = {
    "inf literal": "{{ inputs.xs[1e999] }}",  # Jinja compiles the constant to the bare name `inf`: NameError
    "deep parentheses": "{{ " + "(" * 150 + "1" + ")" * 150 + " }}",  # RecursionError
    "deeply nested ifs": "{% if 1 %}" * 200 + "x" + "{% endif %}" * 200,  # IndentationError from compile()
    "deeply nested loops": "".join(f"{{% for i{k} in inputs.xs %}}" for k in range(30)) + "x"
                           + "{% endfor %}" * 30,  # SyntaxError: too many statically nested blocks
    "recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",  # RecursionError
}


@pytest.mark.parametrize("template", UNRUNNABLE.values(), ids=UNRUNNABLE.keys())
def test_a_template_jinja_cannot_run_is_a_spec_error(tmp_path, mixed_cluster, template):
    path = tmp_path / "template.yaml"
    path.write_text(with_template(template), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_workflow(path, mixed_cluster)
    assert_one_line_per_problem(err.value)


# Templates the bounded sandbox (MAX_REPEAT, MAX_RANGE) is meant to stop from exhausting memory or time.
HUNGRY = {
    "chained repetition": "{{ 'ab' * 99999 * 99999 }}",  # each factor is under MAX_REPEAT; the product is 20 GB
    "huge format width": "{{ '{:>2147483647}'.format(1) }}",  # a 2 GB string
    "nested loops": "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}",  # 10^10
}


@pytest.mark.parametrize("template", HUNGRY.values(), ids=HUNGRY.keys())
def test_a_template_cannot_exhaust_memory_or_time_during_validation(tmp_path, template):
    path = tmp_path / "hungry.yaml"
    path.write_text(with_template(template), encoding="utf-8")
    assert validate_in_subprocess(path, timeout_s=3) in ("ok", "spec error")


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def validate_cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fate_ray.cli", "validate", str(path), "--cluster",
                           str(MIXED_CLUSTER_FILE)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)


BROKEN = {
    "truncated.yaml": EXAMPLES["rag_rerank.yaml"][: len(EXAMPLES["rag_rerank.yaml"]) // 3],
    "unknown_model.yaml": EXAMPLES["rag_rerank.yaml"].replace("qwen2.5-32b", "qwen2.5-320b"),
    "cycle.yaml": EXAMPLES["router_specialists.yaml"].replace("after: [router]", "after: [merge]", 1),
    "junk.yaml": "\x00\ufeff: [ {{ }\n\t- :",
    "a_list.yaml": "- just\n- a list\n",
    "later_item.yaml": LATER_ITEM_FAILS,
}
ODD = {"anchor.yaml": RECURSIVE_ANCHOR}  # may load or be refused, but cleanly


@pytest.mark.parametrize("name", sorted(EXAMPLES) + sorted(BROKEN) + sorted(ODD) + ["missing.yaml"])
def test_cli_validate_exits_0_or_2_without_a_traceback(tmp_path, name):
    if name in EXAMPLES:
        path = ROOT / "workflows" / name
    else:
        path = tmp_path / name
        if name in BROKEN or name in ODD:
            path.write_text({**BROKEN, **ODD}[name], encoding="utf-8")
    done = validate_cli(path)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode in (0, 2)
    if name not in ODD:
        assert done.returncode == (0 if name in EXAMPLES else 2), done.stderr
    if done.returncode:
        assert done.stderr.strip() and all(line.startswith("error: ") for line in done.stderr.splitlines())
    else:
        assert done.stdout.startswith(f"ok: {path}")
