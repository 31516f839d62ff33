"""Workflow names become output file names only after sanitising: no path separators, no `..`, bounded length,
distinct names kept distinct."""

from __future__ import annotations

from pathlib import Path

import pytest

from fate_ray.runtime.driver import MAX_STEM_CHARS, file_stem, unique_stems


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "a/../../b", "/abs/path", "dir\\\\win", ".hidden",
                                  "x" * 500, "", "naïve name?*", "rag-rerank@02000000"])
def test_every_name_stays_a_plain_file_inside_the_output_folder(name, tmp_path):
    stem = file_stem(name)
    assert stem and len(stem) <= MAX_STEM_CHARS
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".")
    path = (tmp_path / f"{stem}.jsonl").resolve()
    assert path.parent == tmp_path.resolve()


def test_ordinary_names_are_kept_as_they_are():
    assert file_stem("mapreduce-summary-2") == "mapreduce-summary-2"
    assert file_stem("doc_qa.v1") == "doc_qa.v1"


def test_names_that_sanitise_alike_get_distinct_files():
    stems = unique_stems(["a/b", "a_b", "a?b", "y" * 300, "y" * 301])
    assert stems[:3] == ["a_b", "a_b-2", "a_b-3"]
    assert len(set(stems)) == 5 and all(len(s) <= MAX_STEM_CHARS for s in stems)
    assert Path(stems[4]).name == stems[4]


def test_repeated_names_get_ids_that_collide_with_no_other_workflow():
    from fate_ray.runtime.driver import unique_ids
    from fate_ray.workload import Workflow

    wfs = [Workflow(wid, "t", 0.0, {}, ()) for wid in ("a", "a-2", "a")]
    assert [w.workflow_id for w in unique_ids(wfs)] == ["a", "a-2", "a-3"]
