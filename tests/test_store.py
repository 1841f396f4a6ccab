"""The resumable store: a cut-off write is dropped, a different run is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from flipscope.data.store import ResultStore, read_header, read_rows
from flipscope.errors import FlipscopeError

HEADER = {"config": {"conditions": ["image", "blank"]}, "model": "organism"}


def _rows(unit: int) -> list[dict]:
    return [{"question_id": f"q{unit}", "prompt_index": i, "margin": 0.5 * i} for i in range(3)]


def test_resume_drops_a_cut_off_unit_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = ResultStore.open(tmp_path / "whole.jsonl", HEADER)
    for unit in range(4):
        whole.append(f"u{unit}", _rows(unit))

    cut = tmp_path / "cut.jsonl"
    store = ResultStore.open(cut, HEADER)
    for unit in range(2):
        store.append(f"u{unit}", _rows(unit))
    with cut.open("a") as handle:  # a unit killed mid-write: rows without a marker, a torn line
        handle.write('{"question_id": "q2", "prompt_index": 0, "margin": 0.0}\n{"question_id": "q2", "pro')
    assert len(read_rows(cut)) == 6
    resumed = ResultStore.open(cut, HEADER)
    assert set(resumed.done) == {"u0", "u1"}
    for unit in range(4):
        if f"u{unit}" not in resumed.done:
            resumed.append(f"u{unit}", _rows(unit))
    assert cut.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert read_header(cut) == HEADER and len(read_rows(cut)) == 12


def test_a_different_run_is_refused(tmp_path: Path) -> None:
    ResultStore.open(tmp_path / "s.jsonl", HEADER).append("u0", _rows(0))
    with pytest.raises(FlipscopeError, match="different run \\(differs in \\['model'\\]\\)"):
        ResultStore.open(tmp_path / "s.jsonl", {**HEADER, "model": "medgemma"})
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(FlipscopeError, match="not a flipscope store"):
        ResultStore.open(tmp_path / "junk.jsonl", HEADER)
    store = ResultStore.open(tmp_path / "s.jsonl", HEADER)
    with pytest.raises(FlipscopeError, match="already in"):
        store.append("u0", _rows(0))
