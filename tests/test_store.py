"""The resumable store: a cut-off write is dropped, a different run is refused, damage is named and
repaired explicitly, and a second writer is refused."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flipscope.data.store import ResultStore, iter_rows, iter_units, read_header, read_rows, read_units, repair_store
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
    store.close()
    resumed = ResultStore.open(cut, HEADER)
    assert set(resumed.done) == {"u0", "u1"}
    for unit in range(4):
        if f"u{unit}" not in resumed.done:
            resumed.append(f"u{unit}", _rows(unit))
    assert cut.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert read_header(cut) == HEADER and len(read_rows(cut)) == 12


def test_a_different_run_is_refused(tmp_path: Path) -> None:
    ResultStore.open(tmp_path / "s.jsonl", HEADER).append("u0", _rows(0))
    with pytest.raises(FlipscopeError, match=r"different run \(differs in model: .* in the store, \"medgemma\" now\)"):
        ResultStore.open(tmp_path / "s.jsonl", {**HEADER, "model": "medgemma"})
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(FlipscopeError, match="not a flipscope store"):
        ResultStore.open(tmp_path / "junk.jsonl", HEADER)
    store = ResultStore.open(tmp_path / "s.jsonl", HEADER)
    with pytest.raises(FlipscopeError, match="already in"):
        store.append("u0", _rows(0))


def _store(path: Path, units: int = 4) -> Path:
    with ResultStore.open(path, HEADER) as store:
        for unit in range(units):
            store.append(f"u{unit}", _rows(unit))
    return path


def _damage_line(path: Path, number: int, text: str = '{"question_id": "q1", "prom\n') -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = text.encode()
    path.write_bytes(b"".join(lines))


def test_a_damaged_line_before_finished_units_is_named_by_every_reader_and_by_resume(tmp_path: Path) -> None:
    path = _store(tmp_path / "s.jsonl")
    _damage_line(path, 6)  # a row of unit u1 (lines 2-5 are u0, 6-9 are u1)
    before = path.read_bytes()
    for read in (read_rows, lambda p: list(iter_rows(p)), lambda p: ResultStore.open(p, HEADER)):
        with pytest.raises(FlipscopeError, match=r"line 6 is cut off or not a JSON object.*flipscope repair"):
            read(path)
    assert path.read_bytes() == before  # resume refused and truncated nothing
    _damage_line(path, 6, '{"question_id": "q1", "prompt_index": 0, "margin": 0.0}\n')
    _damage_line(path, 7, '{"done": "u0", "rows": 3}\n')  # a unit marked done twice, a row short
    with pytest.raises(FlipscopeError, match="line 7 marks unit 'u0' done with 3 rows, but 1 rows precede it"):
        read_rows(path)


def test_repair_keeps_every_intact_unit_and_the_rerun_ends_with_the_whole_store(tmp_path: Path) -> None:
    whole = _store(tmp_path / "whole.jsonl")
    path = _store(tmp_path / "s.jsonl")
    _damage_line(path, 10)  # the first row of u2
    damaged = path.read_bytes()
    report = repair_store(path)
    assert report["kept"] == 3 and report["dropped"] == ["lines 10-13 (unit 'u2')"]
    assert Path(report["backup"]).read_bytes() == damaged
    assert [r["question_id"] for r in read_rows(path)] == ["q0"] * 3 + ["q1"] * 3 + ["q3"] * 3
    with ResultStore.open(path, HEADER) as store:
        assert set(store.done) == {"u0", "u1", "u3"}
        store.append("u2", _rows(2))
    assert sorted(read_units(path).items()) == sorted(read_units(whole).items())


_WRITER = """
import sys, time
from flipscope.data.store import ResultStore
store = ResultStore.open(sys.argv[1], {"model": "organism"})
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_is_refused_with_the_holder_named_and_a_dead_holder_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(FlipscopeError, match=rf"being written by PID {holder.pid} on .*use another output"):
            ResultStore.open(path, {"model": "organism"})
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING), ResultStore.open(path, {"model": "organism"}) as store:
        store.append("u0", _rows(0))
    assert f"PID {holder.pid} is no longer running" in caplog.text
    assert [u for u, _ in iter_units(path)] == ["u0"]
