"""`fate-ray explain`: every placement of a simulation has a decision record whose choice is where the stage ran,
whose candidates carry FATE's terms by name, and which the CLI prints as a table with a one-sentence verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fate_ray.explain import TERMS, lookahead_changed, read_decisions, verdict
from fate_ray.schema.cluster import load_cluster
from fate_ray.schema.workflow import load_workflow
from fate_ray.sim.simulator import SimConfig, simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run():
    cluster = load_cluster(ROOT / "workflows" / "clusters" / "mixed-h100-l4.yaml")
    wfs = [load_workflow(ROOT / "workflows" / f"{n}.yaml", cluster)[1] for n in ("rag_rerank", "mapreduce_summary")]
    decisions: list[dict] = []
    result = simulate(cluster, wfs, "fate", SimConfig(seed=0), record_trace=True, decisions=decisions)
    return result, decisions


def test_every_placement_is_recorded_where_it_ran(run):
    result, decisions = run
    ran: dict[tuple[str, str], set[str]] = {}
    for row in result.trace_rows():  # one row per shard
        ran.setdefault((row["workflow"], row["stage"]), set()).add(row["device"])
    assert {(r["workflow"], r["stage"]): set(r["chosen"]) for r in decisions} == ran
    assert all(sum(r["chosen"].values()) == r["requests"] for r in decisions)


def test_candidates_carry_fates_terms_and_add_up(run):
    _, decisions = run
    for r in decisions:
        assert r["candidates"], r
        assert any(c["device"] in r["chosen"] for c in r["candidates"])
        for c in r["candidates"]:
            assert set(TERMS) <= set(c)
            assert c["future"] == pytest.approx(c["residency"] + c["locality"] + c["prefix"] + c["occupancy"],
                                                abs=1e-3)
            assert c["score"] == pytest.approx(c["immediate"] + c["future"] + c["reach"], abs=1e-3)
            assert c["immediate"] == pytest.approx(c["queue"] + c["activation"] + c["service"], abs=1e-3)


def test_the_verdict_names_the_winner_and_the_runner_up():
    record = {"workflow": "w", "stage": "s", "chosen": {"a": 4}, "candidates": [
        {"device": "a", "immediate": 5.0, "residency": -2.0, "locality": -1.0, "prefix": 0.0, "future": -3.0,
         "reach": 0.0, "score": 2.0},
        {"device": "b", "immediate": 4.0, "residency": 0.0, "locality": 0.0, "prefix": 0.0, "future": 0.0,
         "reach": 0.5, "score": 4.5}]}
    assert verdict(record) == ("a won (score 2.00 s); runner-up b would have cost 4.50 s (+2.50 s), mostly residency "
                               "(+2.00 s); the look-ahead overrode b, the earliest finish now")
    assert lookahead_changed(record)


def fate_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fate_ray.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_simulate_explain_then_explain_one_stage(tmp_path):
    out = tmp_path / "decisions.jsonl"
    sim = fate_ray("simulate", "workflows/rag_rerank.yaml", "--policy", "fate", "--explain", str(out))
    assert sim.returncode == 0, sim.stderr
    records = read_decisions(out)
    assert {r["stage"] for r in records} == {"rewrite", "summarise", "rerank", "answer"}
    stage = records[-1]["stage"]
    shown = fate_ray("explain", str(out), "--workflow", records[-1]["workflow"], "--stage", stage)
    assert shown.returncode == 0, shown.stderr
    assert f"/ {stage} (" in shown.stdout and "immediate (s)" in shown.stdout and "residency (s)" in shown.stdout
    assert verdict(records[-1]) in " ".join(shown.stdout.split())


def test_a_file_that_is_not_a_decisions_file_is_refused_in_one_sentence(tmp_path):
    bad = tmp_path / "trace.jsonl"
    bad.write_text(json.dumps({"workflow": "w"}) + "\n")
    proc = fate_ray("explain", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {bad}:1: not a decision record (write one with `fate-ray simulate "
                                   "--explain FILE` or `fate-ray run --explain`)")
    assert "Traceback" not in proc.stderr
