"""The example workflows in workflows/*.yaml validate and compile; broken variants of them fail with one clear line
per problem (`error: FILE:LINE: message`) that points at the right line."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from fate_ray.schema.cluster import ClusterSpec, load_cluster
from fate_ray.schema.errors import InputError
from fate_ray.schema.workflow import load_workflow
from fate_ray.workload import ContextPart, OutputPart, Workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "workflows"
CLUSTERS_DIR = WORKFLOWS_DIR / "clusters"
CATALOG = CLUSTERS_DIR / "catalog.yaml"
EXAMPLES = sorted(WORKFLOWS_DIR.glob("*.yaml"))
CLUSTER_FILES = {"mixed-h100-l4": CLUSTERS_DIR / "mixed-h100-l4.yaml", "local": CLUSTERS_DIR / "local.yaml"}

REQUIRED_EXAMPLES = {
    "rag_rerank.yaml", "mapreduce_summary.yaml", "metagpt_rounds.yaml", "self_consistency.yaml",
    "router_specialists.yaml", "multiturn_chain.yaml",
}


@pytest.fixture(scope="module")
def clusters() -> dict[str, ClusterSpec]:
    return {name: load_cluster(path) for name, path in CLUSTER_FILES.items()}


@pytest.fixture(scope="module")
def default_cluster(clusters) -> ClusterSpec:
    return clusters["mixed-h100-l4"]


# ---------------------------------------------------------------------------------------------------------------
# The examples themselves


def test_the_examples_are_there():
    names = {p.name for p in EXAMPLES}
    assert REQUIRED_EXAMPLES <= names, f"missing: {sorted(REQUIRED_EXAMPLES - names)}"
    assert len(EXAMPLES) >= 6


def test_local_cluster_is_a_small_cpu_box(clusters):
    local = clusters["local"]
    assert [d.type for d in local.devices] == ["cpu", "cpu"]
    assert not local.device_types["cpu"].supports_sleep
    assert set(local.models) == set(clusters["mixed-h100-l4"].models)
    for name in local.models:
        assert local.devices_for(name) == local.devices, name


def _assert_topological(wf: Workflow) -> None:
    assert sorted(wf.order) == sorted(wf.stages), "order must list every stage exactly once"
    position = {sid: i for i, sid in enumerate(wf.order)}
    for sid, stage in wf.stages.items():
        for parent in stage.parents:
            assert position[parent] < position[sid], f"{parent} must come before {sid} in {wf.order}"


@pytest.mark.parametrize("cluster_name", sorted(CLUSTER_FILES))
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_and_compiles(path: Path, cluster_name: str, clusters):
    spec, wf = load_workflow(path, clusters[cluster_name])
    assert wf.name == spec.name
    assert len(wf.models) >= 2, "an example should exercise model residency: use at least two models"
    assert wf.models <= set(spec.models), "the `models:` list should name every model the stages use"
    _assert_topological(wf)
    for stage in wf.stages.values():
        assert stage.num_requests == len(stage.prompts) >= 1
        assert 1 <= stage.expected_output_tokens <= stage.max_tokens


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_documents_itself(path: Path):
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, "start with a comment saying what application it models and what state it exercises"
    assert "exercises" in " ".join(header)


def _load(name: str, cluster: ClusterSpec) -> Workflow:
    return load_workflow(WORKFLOWS_DIR / name, cluster)[1]


def test_rag_rerank_shape(default_cluster):
    wf = _load("rag_rerank.yaml", default_cluster)
    summarise = wf.stages["summarise"]
    assert summarise.map_source == "inputs.documents" and summarise.num_requests >= 6
    # every summarise request starts with the same long system prefix
    firsts = {p[0] for p in summarise.prompts}
    assert len(firsts) == 1 and next(iter(firsts)).tokens >= 300
    assert wf.stages["rerank"].model == "qwen2.5-3b"
    assert wf.stages["answer"].model in {"qwen2.5-14b", "qwen2.5-32b"}


def test_mapreduce_shape(default_cluster):
    wf = _load("mapreduce_summary.yaml", default_cluster)
    assert wf.stages["summarise"].num_requests >= 8 and wf.stages["summarise"].model == "qwen2.5-1.5b"
    reducers = [s for s in wf.stages.values() if s.model == "llama3.1-8b"]
    assert len(reducers) == 2, "two levels of reduction on the 8b"
    assert wf.order[-1] == "final" and wf.stages["final"].model == "qwen2.5-14b"


def test_metagpt_shape(default_cluster):
    wf = _load("metagpt_rounds.yaml", default_cluster)
    engineer, reviewer, reviser = (wf.stages[s] for s in ("engineer", "reviewer", "reviser"))
    assert wf.stages["architect"].model == "qwen2.5-32b"
    assert engineer.map_source == "inputs.files" and engineer.continues is None
    # the architect's design is part of every engineer's shared prefix
    assert all(OutputPart("architect", None) in p for p in engineer.prompts)
    assert reviewer.map_source == "engineer.outputs" and reviewer.model == "qwen2.5-14b"
    assert [p[0] for p in reviser.prompts] == [ContextPart("engineer", i) for i in range(engineer.num_requests)]
    assert reviser.continues == "engineer" and reviser.num_requests == engineer.num_requests


def test_self_consistency_shape(default_cluster):
    wf = _load("self_consistency.yaml", default_cluster)
    solve = wf.stages["solve"]
    assert solve.repeat == 8 and solve.num_requests == 8 and solve.model == "llama3.1-8b"
    assert len(set(solve.prompts)) == 1, "the samples share one prompt, so they share its prefix-cache blocks"
    assert wf.stages["vote"].model == "qwen2.5-3b"


def test_router_shape(default_cluster):
    wf = _load("router_specialists.yaml", default_cluster)
    specialists = [c for c in wf.children()["router"] if c != "merge"]
    assert {wf.stages[c].model for c in specialists} == {"qwen2.5-14b", "llama3.1-8b", "qwen2.5-3b"}
    assert set(wf.stages["merge"].parents) >= set(specialists)


def test_multiturn_shape(default_cluster):
    wf = _load("multiturn_chain.yaml", default_cluster)
    turns = [s for s in wf.order if s.startswith("turn_")]
    assert len(turns) >= 4
    for prev, cur in pairwise(turns):
        stage = wf.stages[cur]
        assert stage.continues == prev and stage.model == wf.stages[prev].model


# ---------------------------------------------------------------------------------------------------------------
# Broken variants: one line per problem, pointing at the right line


def _mutate(tmp_path: Path, example: str, old: str, new: str) -> tuple[Path, str]:
    text = (WORKFLOWS_DIR / example).read_text(encoding="utf-8")
    assert text.count(old) == 1, f"mutation anchor {old!r} must occur once in {example}"
    text = text.replace(old, new)
    path = tmp_path / example
    path.write_text(text, encoding="utf-8")
    return path, text


def _line_of(text: str, needle: str, start: int = 1) -> int:
    """1-based number of the first line at or after `start` that contains `needle`."""
    for n, line in enumerate(text.splitlines()[start - 1:], start):
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not found after line {start}")


def _spec_error(path: Path, cluster: ClusterSpec) -> InputError:
    with pytest.raises(InputError) as info:
        load_workflow(path, cluster)
    err = info.value
    lines = str(err).splitlines()
    assert len(lines) == len(err.problems) >= 1, "str() is one line per problem"
    for line, problem in zip(lines, err.problems, strict=True):
        assert line == f"error: {path}:{problem.line}: {problem.message}"
        assert re.fullmatch(r"error: .+:[1-9]\d*: \S.*", line), line
    return err


def _only(err: InputError):
    assert len(err.problems) == 1, str(err)
    return err.problems[0]


def test_typo_in_parent_suggests_the_name(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "rag_rerank.yaml", "after: [rewrite, summarise]", "after: [rewrite, sumarise]")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "after: [rewrite, sumarise]")
    assert "unknown stage 'sumarise'" in problem.message
    assert "did you mean 'summarise'" in problem.message


def test_typo_in_continues_suggests_the_name(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "multiturn_chain.yaml", "continues: turn_3", "continues: turn3")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "continues: turn3")
    assert "did you mean 'turn_3'" in problem.message


def test_cycle_is_named(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "rag_rerank.yaml", "  - id: rewrite\n    model: qwen2.5-1.5b\n",
                         "  - id: rewrite\n    model: qwen2.5-1.5b\n    after: [answer]\n")
    problem = _only(_spec_error(path, default_cluster))
    m = re.search(r"dependency cycle ([\w\- >]+);", problem.message)
    assert m, problem.message
    cycle = m.group(1).split(" -> ")
    assert cycle[0] == cycle[-1] and {"rewrite", "answer"} <= set(cycle)
    spec_parents = {"rewrite": {"answer"}, "summarise": {"rewrite"}, "rerank": {"rewrite", "summarise"},
                    "answer": {"summarise", "rerank"}}
    for parent, child in pairwise(cycle):
        assert parent in spec_parents[child], f"{parent} -> {child} is not a dependency"
    # the line is the `after:` of the stage the cycle is reported from
    assert problem.line == _line_of(text, "after:", _line_of(text, f"- id: {cycle[0]}"))


def test_unknown_model(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "router_specialists.yaml", "model: qwen2.5-3b", "model: qwen-2.5-3b")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "model: qwen-2.5-3b")
    assert "unknown model 'qwen-2.5-3b'" in problem.message and "did you mean 'qwen2.5-3b'" in problem.message


def test_unknown_model_in_models_list(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "self_consistency.yaml", "models: [llama3.1-8b, qwen2.5-3b]",
                         "models: [llama3.1-8b, qwen2.5-3b, mistral-7b]")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "models: [")
    assert "unknown model 'mistral-7b'" in problem.message


def _l4_only_cluster(tmp_path: Path, profile_big_models: bool) -> Path:
    """Four L4s, models from the real catalog (absolute path: catalog paths are relative to the cluster file).

    With `profile_big_models`, the 14b and 32b are given an L4 profile inline, so they are known to the cluster
    but too big for an L4 (the catalog profiles them on H100 only)."""
    text = (
        "name: l4-only\n"
        f"catalog: {CATALOG}\n"
        "device_types:\n"
        "  L4-24G: {memory_gib: 24, concurrency: 2, host_offload_gib: 96}\n"
        "nodes:\n"
        "  - name: l4-node\n"
        "    devices: [{type: L4-24G, count: 4}]\n"
    )
    if profile_big_models:
        catalog = yaml.safe_load(CATALOG.read_text(encoding="utf-8"))["models"]
        inline = {}
        for name in ("qwen2.5-14b", "qwen2.5-32b"):
            model = dict(catalog[name])
            h100 = model["profiles"]["H100-80G"]
            # test-only figures: the model cannot fit an L4 anyway
            model["profiles"] = {**model["profiles"], "L4-24G": {k: v * 4 for k, v in h100.items()}}
            inline[name] = model
        text += yaml.safe_dump({"models": inline}, sort_keys=False)
    path = tmp_path / "l4-only.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_big_model_on_an_l4_only_cluster(tmp_path):
    cluster = load_cluster(_l4_only_cluster(tmp_path, profile_big_models=True))
    assert not cluster.devices_for("qwen2.5-32b") and cluster.devices_for("llama3.1-8b")
    src = WORKFLOWS_DIR / "metagpt_rounds.yaml"
    text = src.read_text(encoding="utf-8")
    path = tmp_path / src.name
    path.write_text(text, encoding="utf-8")
    err = _spec_error(path, cluster)
    # architect and integrate use the 32b, reviewer the 14b: one line each, at the stage's `model:` line
    expected = [
        (_line_of(text, "model: qwen2.5-32b", _line_of(text, "- id: architect")), "'qwen2.5-32b' needs 73 GiB"),
        (_line_of(text, "model: qwen2.5-14b", _line_of(text, "- id: reviewer")), "'qwen2.5-14b' needs 37.5 GiB"),
        (_line_of(text, "model: qwen2.5-32b", _line_of(text, "- id: integrate")), "'qwen2.5-32b' needs 73 GiB"),
    ]
    assert [p.line for p in err.problems] == [line for line, _ in expected]
    for problem, (_, needle) in zip(err.problems, expected, strict=True):
        assert needle in problem.message and "fits no device of cluster 'l4-only'" in problem.message
        assert "largest 24 GiB" in problem.message


def test_l4_only_cluster_can_use_the_shared_catalog(tmp_path):
    cluster = load_cluster(_l4_only_cluster(tmp_path, profile_big_models=False))
    assert not cluster.devices_for("qwen2.5-32b")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_non_positive_max_tokens(tmp_path, default_cluster, value):
    path, text = _mutate(tmp_path, "self_consistency.yaml", "max_tokens: 48", f"max_tokens: {value}")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, f"max_tokens: {value}")
    assert "max_tokens" in problem.message and "greater than 0" in problem.message


def test_duplicate_stage_id(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "self_consistency.yaml", "  - id: vote\n", "  - id: solve\n")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "- id: solve", _line_of(text, "- id: solve") + 1)
    assert "duplicate stage id 'solve'" in problem.message


def test_template_variable_nobody_provides(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "router_specialists.yaml", "User request: {{ inputs.request }}",
                         "User {{ user_name }} asked: {{ inputs.request }}")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "template:", _line_of(text, "- id: merge"))
    assert "template variable 'user_name' is undefined; no parent or input provides it" in problem.message


def test_template_uses_a_stage_that_is_not_a_parent(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "multiturn_chain.yaml", "Assistant: {{ turn_1.output }}",
                         "Assistant: {{ turn_2.output }}")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "template:", _line_of(text, "- id: title"))
    assert "'turn_2' is undefined; add it to `after`" in problem.message


def test_template_uses_a_missing_input(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "rag_rerank.yaml", "Question: {{ inputs.question }}\n        Answer:",
                         "Question: {{ inputs.questoin }}\n        Answer:")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "template:", _line_of(text, "- id: answer"))
    assert "no input 'questoin'" in problem.message and "did you mean 'question'" in problem.message


@pytest.mark.parametrize("snippet", ["{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                     "{{ inputs['__class__'] }}"])
def test_template_reaching_for_python_internals(tmp_path, default_cluster, snippet):
    path, text = _mutate(tmp_path, "self_consistency.yaml", "A: Let's think step by step.",
                         f"A: Let's think step by step. {snippet}")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "template:", _line_of(text, "- id: solve"))
    assert "Python internals ('__" in problem.message


def test_template_that_does_not_parse(tmp_path, default_cluster):
    path, text = _mutate(tmp_path, "self_consistency.yaml", "{% endfor %}Majority:", "Majority:")
    problem = _only(_spec_error(path, default_cluster))
    assert problem.line == _line_of(text, "template:", _line_of(text, "- id: vote"))
    assert "template does not parse" in problem.message


@pytest.mark.parametrize(("old", "new", "later"), [
    ("    max_tokens: 350\n", "    max_tokens: 350: 400\n", 0),         # mapping value where none is allowed
    # an unclosed bracket is only noticed at the next token that cannot belong to the list: the next line
    ("    after: [reduce_sections]\n", "    after: [reduce_sections\n", 1),
])
def test_malformed_yaml(tmp_path, default_cluster, old, new, later):
    path, text = _mutate(tmp_path, "mapreduce_summary.yaml", old, new)
    problem = _only(_spec_error(path, default_cluster))
    assert problem.message.startswith("malformed YAML: ")
    assert problem.line == _line_of(text, new.strip()) + later


def test_several_problems_are_all_reported(tmp_path, default_cluster):
    text = (WORKFLOWS_DIR / "router_specialists.yaml").read_text(encoding="utf-8")
    text = text.replace("model: qwen2.5-3b", "model: qwen-2.5-3b").replace(
        "after: [router, code_expert, math_expert, chat_expert]", "after: [router, code_expert, math_expert, chat]")
    path = tmp_path / "router_specialists.yaml"
    path.write_text(text, encoding="utf-8")
    err = _spec_error(path, default_cluster)
    assert [p.line for p in err.problems] == [_line_of(text, "model: qwen-2.5-3b"), _line_of(text, "chat]")]


# ---------------------------------------------------------------------------------------------------------------
# Known validator/compiler bugs found while writing the examples (strict: remove the marker once fixed)


def test_template_render_failure_is_a_spec_error(tmp_path, default_cluster):
    path, _ = _mutate(tmp_path, "self_consistency.yaml", "Q: {{ inputs.problem }}", "Q: {{ inputs.problem + 1 }}")
    _spec_error(path, default_cluster)


def test_duplicate_yaml_key_is_rejected(tmp_path, default_cluster):
    path, _ = _mutate(tmp_path, "self_consistency.yaml", "    max_tokens: 48\n",
                      "    max_tokens: 48\n    max_tokens: 4800\n")
    _spec_error(path, default_cluster)


def test_map_item_from_a_parent_is_counted(tmp_path, default_cluster):
    path, _ = _mutate(tmp_path, "metagpt_rounds.yaml", "{{ engineer.outputs[index] }}", "{{ item }}")
    wf = load_workflow(path, default_cluster)[1]
    for i, prompt in enumerate(wf.stages["reviewer"].prompts):
        assert OutputPart("engineer", i) in prompt
