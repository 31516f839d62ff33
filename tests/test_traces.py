"""Real-trace importers: small hand-written traces of each format, then the shipped real data when present."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fate_ray.schema.cluster import default_cluster_path, load_cluster
from fate_ray.schema.errors import InputError
from fate_ray.traces import (
    TraceWarning,
    catalog_models_of,
    load_alibaba,
    load_dags,
    load_lmcache,
    load_mooncake,
    load_parrot_metagpt,
    load_wfcommons,
)
from fate_ray.traces.common import models_by_type, rng_for
from fate_ray.workload import ContextPart, OutputPart, TextPart, Workflow, expected_prompt_tokens, stable_key

REALDAGS = Path(__file__).resolve().parents[2] / "shared" / "realdags"
ALIBABA_HEADER = "task_name,job_name,instance_num,status,start_time,end_time,field7,plan_cpu,plan_mem"


@pytest.fixture(scope="module")
def catalog() -> dict[str, float]:
    return catalog_models_of(load_cluster(default_cluster_path()))


def wfformat(tasks: list[tuple[str, list[str], float, str | None]]) -> dict:
    """A WfFormat 1.5 document from (id, parents, runtime_s, program or None) tuples."""
    return {
        "name": "test", "schemaVersion": "1.5",
        "workflow": {
            "specification": {"tasks": [{"name": i, "id": i, "parents": p, "children": []} for i, p, _, _ in tasks]},
            "execution": {"tasks": [{"id": i, "runtimeInSeconds": r, **({"command": {"program": prog}} if prog else {})}
                                    for i, _, r, prog in tasks]},
        },
    }


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def check_dag(wf: Workflow) -> None:
    """The invariants every imported workflow must meet."""
    position = {sid: i for i, sid in enumerate(wf.order)}
    assert set(position) == set(wf.stages) and len(position) == len(wf.order)
    for sid, stage in wf.stages.items():
        assert stage.stage_id == sid
        assert all(position[p] < position[sid] for p in stage.parents)
        assert stage.num_requests == len(stage.prompts) >= 1
        assert stage.shardable == (stage.num_requests > 1)
        assert stage.max_tokens >= stage.expected_output_tokens >= 1
        for prompt in stage.prompts:
            for part in prompt:
                if isinstance(part, (OutputPart, ContextPart)):
                    assert part.parent in stage.parents
                if isinstance(part, ContextPart):
                    assert part.parent == stage.continues
                    assert 0 <= part.item < wf.stages[part.parent].num_requests
                if isinstance(part, TextPart):
                    assert part.tokens >= 1


# --- WfFormat ---------------------------------------------------------------------------------------------------

DIAMOND = [("a", [], 2.0, "split"), ("b", ["a"], 30.0, "work"), ("c", ["a"], 31.0, "work"),
           ("d", ["b", "c"], 5.0, "merge")]


def test_wfformat_diamond_keeps_edges_types_and_keys(tmp_path, catalog):
    path = write_json(tmp_path / "diamond.json", wfformat(DIAMOND))
    wf = load_wfcommons(path, rng_seed=7, catalog_models=catalog)
    check_dag(wf)
    assert (wf.workflow_id, wf.name, wf.arrival_s, wf.source) == ("diamond", "diamond", 0.0, str(path))
    assert {s: wf.stages[s].parents for s in wf.order} == {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
    assert wf.order[0] == "a" and wf.order[-1] == "d"
    assert wf.stages["b"].model == wf.stages["c"].model  # same program, same model
    assert set(wf.models) <= set(catalog)
    for sid, stage in wf.stages.items():
        assert stage.num_requests == 1 and not stage.shardable
        prompt = stage.prompts[0]
        assert prompt[-1].key == stable_key("task", "diamond", sid)
        if stage.continues:
            assert prompt[0] == ContextPart(stage.continues, 0) and len(prompt) == 2
        else:
            program = dict((i, prog) for i, _, _, prog in DIAMOND)[sid]
            assert prompt[0].key == stable_key("sysprompt", "diamond", program)
            assert 256 <= prompt[0].tokens <= 2048
    assert wf.stages["d"].continues is None  # two parents: never continues
    assert wf.stages["d"].prompts[0][1:3] == (OutputPart("b", None), OutputPart("c", None))


def test_wfformat_type_from_name_and_parent_cap(tmp_path, catalog):
    roots = [(f"mProject_ID{i:07d}", [], 1.0, None) for i in range(6)]
    join = ("mAdd_ID0000099", [r[0] for r in roots], 1.0, None)
    wf = load_wfcommons(write_json(tmp_path / "m.json", wfformat([*roots, join])), 1, catalog)
    firsts = {wf.stages[r[0]].prompts[0][0].key for r in roots}
    assert firsts == {stable_key("sysprompt", "m", "mProject")}
    join_stage = wf.stages[join[0]]
    assert join_stage.parents == tuple(r[0] for r in roots)  # every edge kept ...
    outputs = [p for p in join_stage.prompts[0] if isinstance(p, OutputPart)]
    assert [p.parent for p in outputs] == [r[0] for r in roots[:4]]  # ... only 4 outputs in the prompt


def test_sizes_grow_with_runtime_and_stay_in_bounds(tmp_path, catalog):
    tasks = [(f"t{i}", [], runtime_s, "p") for i, runtime_s in enumerate([0.0, 10_000.0, 1e30])]
    wf = load_wfcommons(write_json(tmp_path / "r.json", wfformat(tasks)), 3, catalog)
    own = [wf.stages[f"t{i}"].prompts[0][-1].tokens for i in range(3)]
    out = [wf.stages[f"t{i}"].expected_output_tokens for i in range(3)]
    assert own[0] < own[1] <= own[2] == 8192 and 128 <= own[0]
    assert out[0] < out[1] <= out[2] == 1024 and 16 <= out[0]
    assert all(s.max_tokens == 2 * s.expected_output_tokens for s in wf.stages.values())


def test_about_a_third_of_single_parent_tasks_continue(tmp_path, catalog):
    chain = [("t0", [], 1.0, "p")] + [(f"t{i}", [f"t{i - 1}"], 1.0, "p") for i in range(1, 301)]
    wf = load_wfcommons(write_json(tmp_path / "chain.json", wfformat(chain)), 5, catalog)
    check_dag(wf)
    continuing = sum(1 for s in wf.stages.values() if s.continues)
    assert 0.2 < continuing / 300 < 0.4


def test_missing_parent_edge_is_dropped_with_warning(tmp_path, catalog):
    path = write_json(tmp_path / "w.json", wfformat([("a", [], 1.0, "p"), ("b", ["a", "ghost"], 1.0, "p")]))
    with pytest.warns(TraceWarning, match=r"w\.json:\d+: task 'b' lists parent 'ghost'"):
        wf = load_wfcommons(path, 1, catalog)
    assert wf.stages["b"].parents == ("a",)


def test_cycle_is_a_spec_error(tmp_path, catalog):
    path = write_json(tmp_path / "cyc.json", wfformat([("a", ["b"], 1.0, "p"), ("b", ["a"], 1.0, "p")]))
    with pytest.raises(InputError, match="cyc.json.*cycle"):
        load_wfcommons(path, 1, catalog)


# --- Alibaba ----------------------------------------------------------------------------------------------------

ALIBABA_ROWS = [
    "M1,j_1,2.0,Terminated,0,10,5.0,100.0,0.3",
    "M2,j_1,1.0,Terminated,0,10,10.0,100.0,0.3",
    "R3_1_2,j_1,500.0,Terminated,10,40,12.5,100.0,0.3",
    "X-bad,j_1,1.0,Terminated,0,1,1.0,100.0,0.3",
    "J4_3_9,j_1,1.0,Terminated,40,50,10.0,100.0,0.3",
    "task_LTg0MTUwNTA5,j_2,3.0,Terminated,0,5,5.0,50.0,0.2",
]


def test_alibaba_jobs_edges_fanout_and_warnings(tmp_path, catalog):
    path = tmp_path / "batch_task.csv"
    path.write_text("\n".join([ALIBABA_HEADER, *ALIBABA_ROWS]) + "\n")
    with pytest.warns(TraceWarning) as caught:
        workflows = load_alibaba(path, 11, catalog)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}:5: ") and "X-bad" in m for m in messages)  # header is line 1
    assert any(m.startswith(f"{path}:6: ") and "task 9" in m for m in messages)
    by_id = {wf.workflow_id: wf for wf in workflows}
    assert set(by_id) == {"j_1", "j_2"}
    job = by_id["j_1"]
    check_dag(job)
    assert {s: job.stages[s].parents for s in job.order} == {"M1": (), "M2": (), "R3": ("M1", "M2"), "J4": ("R3",)}
    assert [job.stages[s].num_requests for s in ("M1", "M2", "R3", "J4")] == [2, 1, 64, 1]  # 500 capped at 64
    m1 = job.stages["M1"].prompts
    assert m1[0][0] == m1[1][0] and m1[0][-1] != m1[1][-1]  # instances share the prefix, not their own text
    assert by_id["j_2"].order == ("task_LTg0MTUwNTA5",) and by_id["j_2"].stages["task_LTg0MTUwNTA5"].num_requests == 3


def test_alibaba_wrong_header_is_a_spec_error(tmp_path, catalog):
    path = tmp_path / "other.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match=r"other\.csv:1: .*header"):
        load_alibaba(path, 1, catalog)


# --- Parrot MetaGPT ---------------------------------------------------------------------------------------------

def parrot_call(system: str, user: str, prompt_tokens: int, completion_tokens: int) -> tuple[dict, dict]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"system": system, "user_msg": user}, {"object": "chat.completion", "choices": [], "usage": usage}


def write_parrot(path: Path) -> Path:
    shared = "S" * 400  # 400 chars common to both calls of round 0
    r0 = {"a.py": parrot_call("eng", shared + "write a.py", 120, 50), "b.py": parrot_call("eng", shared + "b", 110, 70)}
    r1 = {"a.py": parrot_call("rev", "review a.py " * 40, 300, 20), "c.py": parrot_call("rev", "new c.py " * 90, 400, 30)}
    lines = [{f"r{k}_queries": {n: q for n, (q, _) in calls.items()},
              f"r{k}_responses": {n: r for n, (_, r) in calls.items()}} for k, calls in enumerate([r0, r1])]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_parrot_rounds_continue_per_file_and_match_usage(tmp_path, catalog):
    wf = load_parrot_metagpt(write_parrot(tmp_path / "meta.jsonl"), 2, catalog)
    check_dag(wf)
    assert wf.order == ("r0", "r1") and wf.stages["r1"].parents == ("r0",) and wf.stages["r1"].continues == "r0"
    r0, r1 = wf.stages["r0"], wf.stages["r1"]
    assert r0.prompts[0][0] == r0.prompts[1][0] and r0.prompts[0][0].tokens > 0  # the shared round prefix
    assert [sum(p.tokens for p in prompt) for prompt in r0.prompts] == [120, 110]
    continued, fresh = r1.prompts  # a.py existed in round 0; c.py is new
    assert continued[0] == ContextPart("r0", 0)
    assert 120 + 50 + continued[1].tokens == 300  # context (prompt + answer) + new text = traced prompt
    assert OutputPart("r0", None) in fresh
    assert sum(p.tokens for p in fresh if isinstance(p, TextPart)) + 50 + 70 == 400
    assert r1.expected_output_tokens == 25 and r1.max_tokens >= 30


def test_parrot_without_rounds_is_a_spec_error(tmp_path, catalog):
    path = tmp_path / "x.jsonl"
    path.write_text('{"timestamp": 1}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:1: .*rK_queries"):
        load_parrot_metagpt(path, 1, catalog)


# --- Mooncake ---------------------------------------------------------------------------------------------------

def test_mooncake_shared_blocks_share_keys(tmp_path):
    path = tmp_path / "trace.jsonl"
    records = [{"timestamp": 0, "input_length": 1100, "output_length": 40, "hash_ids": [0, 1, 2]},
               {"timestamp": 1500, "input_length": 1300, "output_length": 7, "hash_ids": [0, 1, 3]},
               {"timestamp": 3000, "input_length": 10, "output_length": 3, "hash_ids": [4]}]
    path.write_text("\n".join(map(json.dumps, records)))
    workflows = load_mooncake(path, time_scale=2.0)
    assert [wf.arrival_s for wf in workflows] == [0.0, 3.0, 6.0]
    prompts = [wf.stages[wf.order[0]].prompts[0] for wf in workflows]
    assert [sum(p.tokens for p in prompt) for prompt in prompts] == [1100, 1300, 10]
    assert prompts[0][:2] == prompts[1][:2] and prompts[0][2].key != prompts[1][2].key
    assert prompts[0][0].key == stable_key("mooncake", 0)
    stage = workflows[1].stages[workflows[1].order[0]]
    assert (stage.model, stage.expected_output_tokens, stage.max_tokens) == ("llama3.1-8b", 7, 7)
    assert len({wf.workflow_id for wf in workflows}) == 3
    assert len(load_mooncake(path, limit=2)) == 2


# --- LMCache agent sessions -------------------------------------------------------------------------------------

GREETING = "Hi! How can I help you today?"  # 29 characters -> 8 tokens at 4 characters per token
LMCACHE_LINES = [
    {"timestamp": 1_000_000, "input": GREETING, "output": "I need to change a flight.", "session_id": "s1"},
    {"timestamp": 2_000_000, "input": "I need to change a flight.", "output": "Sure, what is your reservation id?",
     "session_id": "s1"},
    {"timestamp": 3_000_000, "input": GREETING + "\n\nWhat is your reservation id?", "output": "",
     "session_id": "s1"},
    {"timestamp": 1_500_000, "input": "x" * 40, "output": "y" * 9, "session_id": "s2"},
    {"timestamp": "soon", "input": "?", "output": "", "session_id": "s2"},
]


def write_lmcache(path: Path, order: tuple[int, ...] = (0, 2, 1, 3, 4)) -> Path:
    """The calls above, written out of time order (and a blank line)."""
    path.write_text("\n".join(json.dumps(LMCACHE_LINES[k]) for k in order) + "\n\n")
    return path


def test_lmcache_sessions_are_chains_whose_context_grows(tmp_path, catalog):
    """s1 in time order: the greeting (8 tokens), then a new text (26 chars, 7 tokens), then the greeting again
    plus 30 new characters (8 tokens): only text no earlier call of the session sent counts as new input."""
    path = write_lmcache(tmp_path / "trace.jsonl")
    with pytest.warns(TraceWarning, match=r"trace\.jsonl:5: not an LMCache agent call"):
        sessions = load_lmcache(path, 7, catalog)
    assert [w.workflow_id for w in sessions] == ["s1", "s2"]
    s1, s2 = sessions
    for wf in sessions:
        check_dag(wf)
    assert (s1.arrival_s, s2.arrival_s) == (0.0, 0.5) and s1.source == str(path)
    assert s1.order == ("call0", "call1", "call2")
    c0, c1, c2 = (s1.stages[s] for s in s1.order)
    assert c0.prompts == ((TextPart(stable_key("lmcache", "s1", 0), 8),),)
    assert c1.prompts == ((ContextPart("call0", 0), TextPart(stable_key("lmcache", "s1", 1), 7)),)
    assert c2.prompts == ((ContextPart("call1", 0), TextPart(stable_key("lmcache", "s1", 2), 8)),)
    assert (c1.parents, c1.continues, c2.continues) == (("call0",), "call0", "call1")
    assert [(c.expected_output_tokens, c.max_tokens) for c in (c0, c1, c2)] == [(7, 14), (9, 18), (1, 2)]
    assert expected_prompt_tokens(s1)["call2"] == [8 + 7 + 7 + 9 + 8]  # every earlier prompt and output
    assert s2.order == ("call0",) and s2.stages["call0"].prompts[0][0].tokens == 10
    model = models_by_type({"s1": 1}, rng_for(7, path, "s1"), catalog)["s1"]
    assert {st.model for st in s1.stages.values()} == {model} and model in catalog
    (tmp_path / "again").mkdir()
    with pytest.warns(TraceWarning):  # the same file name (the model draw is keyed by it), the lines shuffled
        again = load_lmcache(write_lmcache(tmp_path / "again" / "trace.jsonl", (3, 1, 4, 0, 2)), 7, catalog)
    assert again[0].stages == s1.stages  # only time orders the calls


def test_lmcache_errors_name_the_file(tmp_path, catalog):
    folder = tmp_path / "agents"
    folder.mkdir()
    write_lmcache(folder / "a.jsonl", (0, 1, 2, 3))
    (folder / "empty.jsonl").write_text("")
    (folder / "mooncake.jsonl").write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}')
    with pytest.warns(TraceWarning, match=r"empty\.jsonl:1: empty file"):
        assert [w.workflow_id for w in load_lmcache(folder, 1, catalog)] == ["s1", "s2"]
    assert load_dags(folder, 1, catalog) == []  # not a DAG format
    with pytest.raises(InputError, match=r"mooncake\.jsonl:1: not an LMCache agent trace"):
        load_lmcache(folder / "mooncake.jsonl", 1, catalog)
    with pytest.raises(InputError, match=r"empty\.jsonl:1: .*no LMCache agent call"):
        load_lmcache(folder / "empty.jsonl", 1, catalog)
    (folder / "bad.jsonl").write_text(json.dumps(LMCACHE_LINES[0]) + "\n{oops\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: .*not valid JSON"):
        load_lmcache(folder, 1, catalog)
    with pytest.raises(InputError, match="nope.*no such file"):
        load_lmcache(tmp_path / "nope", 1, catalog)


# --- load_dags and errors ---------------------------------------------------------------------------------------

def test_load_dags_reads_a_folder_and_ignores_other_files(tmp_path, catalog):
    folder = tmp_path / "traces"
    (folder / "sub").mkdir(parents=True)
    write_json(folder / "sub" / "diamond.json", wfformat(DIAMOND))
    (folder / "jobs.csv").write_text("\n".join([ALIBABA_HEADER, ALIBABA_ROWS[0], ALIBABA_ROWS[-1]]) + "\n")
    write_parrot(folder / "meta.jsonl")
    (folder / "mooncake.jsonl").write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}')
    write_json(folder / "chat.json", [{"role": "user", "content": "hi"}])
    (folder / "README.md").write_text("not a trace")
    workflows = load_dags([folder], 1, catalog)
    assert sorted(wf.workflow_id for wf in workflows) == ["diamond", "j_1", "j_2", "meta"]
    assert load_dags(folder, 1, catalog) == workflows


def test_missing_path_is_a_spec_error(tmp_path, catalog):
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope.*no such file"):
        load_dags([missing], 1, catalog)


def test_garbage_json_is_a_spec_error_naming_the_file(tmp_path, catalog):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json at all")
    for target in (garbage, tmp_path):
        with pytest.raises(InputError) as info:
            load_dags([target], 1, catalog)
        assert str(garbage) in str(info.value) and "not valid JSON" in str(info.value)


def test_a_named_file_of_unknown_type_is_a_spec_error(tmp_path, catalog):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt:1: not a trace"):
        load_dags(notes, 1, catalog)


# --- the real traces (../shared/realdags), skipped when absent -------------------------------------------------

@pytest.fixture(scope="module")
def realdags() -> Path:
    if not REALDAGS.is_dir():
        pytest.skip(f"real traces not present at {REALDAGS}")
    return REALDAGS


@pytest.mark.slow
def test_real_wfcommons_and_alibaba_import_as_dags(realdags, catalog):
    wf_files = sorted((realdags / "wfcommons").rglob("*.json"))
    assert len(wf_files) == 16  # realdags/README.md: "16 real workflow executions"
    workflows = [load_wfcommons(f, 0, catalog) for f in wf_files]
    # Every WfFormat task becomes one stage: the source's own task list is the count to meet.
    for f, wf in zip(wf_files, workflows):
        assert len(wf.stages) == len(json.loads(f.read_text())["workflow"]["specification"]["tasks"]), f.name
    csv_path = realdags / "alibaba_v2018" / "alibaba_random_50_dags.csv"
    jobs = load_alibaba(csv_path, 0, catalog)
    # One workflow per job_name and one stage per data row, counted from the CSV itself (the README promises
    # "50 jobs, 197 tasks").
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(jobs) == len({r["job_name"] for r in rows}) == 50
    assert sum(len(j.stages) for j in jobs) == len(rows) == 197
    for wf in workflows + jobs:
        check_dag(wf)
    assert max(s.num_requests for j in jobs for s in j.stages.values()) == 64


def test_real_lmcache_sessions_import_as_chains(realdags, catalog):
    folder = realdags / "lmcache_agent_trace" / "taubench"
    records = [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()
               if line.strip()]
    with pytest.warns(TraceWarning, match="empty file"):  # the folder ships one empty session file
        sessions = load_lmcache(folder, 0, catalog)
    assert len(sessions) == len({r["session_id"] for r in records}) == 24
    assert sum(len(w.stages) for w in sessions) == len(records) == 471  # README: "471 calls"
    assert sessions[0].arrival_s == 0.0 and [w.arrival_s for w in sessions] == sorted(w.arrival_s for w in sessions)
    for wf in sessions:
        check_dag(wf)
        assert len(wf.models) == 1
        prompts = expected_prompt_tokens(wf)
        sizes = [prompts[sid][0] for sid in wf.order]
        assert sizes == sorted(sizes) and sizes[-1] < 16_000  # grows call by call, stays within a context window
    with pytest.warns(TraceWarning):
        assert load_lmcache(folder, 0, catalog) == sessions
    assert len({w.models for w in sessions}) > 1  # sessions draw their models


@pytest.mark.slow
def test_real_traces_are_deterministic_per_seed(realdags, catalog):
    folders = [realdags / "wfcommons", realdags / "alibaba_v2018", realdags / "parrot"]
    first, again, other = (load_dags(folders, seed, catalog) for seed in (1, 1, 2))
    assert first == again
    assert first != other
    assert [wf.workflow_id for wf in first] == [wf.workflow_id for wf in other]
    assert {wf.name for wf in first} >= {"log_3_round", "log_new_rounds", "montage-chameleon-2mass-005d-001"}
