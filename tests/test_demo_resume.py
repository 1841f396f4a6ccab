"""The demo's stage records (`flipscope.reporting.demo_resume`): a rerun reads back each finished
stage while nothing it was computed from changed, and recomputes from the first stage that did."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flipscope.reporting.demo_resume import StageRecords, code_digest

INPUTS = {"model": {"fingerprint": "abc"}, "settings": {"n_films": 4}}


def _stages(calls: list[str], fail: str | None = None, a: int = 1, pause: float = 0.0):
    """Three stages: each writes a file under work and adds to `found` from what the one before added
    (the second after `pause` seconds)."""

    def first(run) -> None:
        calls.append("first")
        (run.work / "a.json").write_text(str(a))
        run.found["a"] = a

    def second(run) -> None:
        calls.append("second")
        if fail == "second":
            raise RuntimeError("died")
        time.sleep(pause)
        (run.work / "sub").mkdir(exist_ok=True)
        (run.work / "sub" / "b.jsonl").write_text(str(run.found["a"] + 1))
        run.found["b"] = {"value": run.found["a"] + 1}

    def third(run) -> None:
        calls.append("third")
        run.found["c"] = run.found["b"]["value"] * 10

    return [first, second, third]


def _demo(work: Path, calls: list[str], inputs=INPUTS, fail: str | None = None, a: int = 1, pause: float = 0.0):
    """The stages' results, which were read back, and each stage's seconds (as computed)."""
    work.mkdir(parents=True, exist_ok=True)
    run = SimpleNamespace(work=work, found={})
    records = StageRecords(work, inputs)
    read = [records.run(k, stage, run) for k, stage in enumerate(_stages(calls, fail, a, pause), 1)]
    return run.found, read, records.seconds


def test_a_rerun_reads_every_finished_stage_back(tmp_path: Path) -> None:
    calls: list[str] = []
    found, read, seconds = _demo(tmp_path, calls, pause=0.05)
    assert found == {"a": 1, "b": {"value": 2}, "c": 20} and read == [False] * 3 and seconds[2] >= 0.05
    again, read, kept = _demo(tmp_path, calls)
    assert again == found and read == [True] * 3 and kept == seconds  # what computing each took
    assert calls == ["first", "second", "third"]  # nothing ran the second time
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["01-first.pkl", "02-second.pkl", "03-third.pkl"]


def test_a_run_that_died_resumes_at_the_stage_it_died_in(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="died"):
        _demo(tmp_path, calls, fail="second")
    calls.clear()
    found, read, _ = _demo(tmp_path, calls)
    assert read == [True, False, False] and calls == ["second", "third"] and found["c"] == 20


def test_a_changed_file_reruns_its_stage_and_those_it_changed(tmp_path: Path) -> None:
    calls: list[str] = []
    _, _, before = _demo(tmp_path, calls, pause=0.05)
    (tmp_path / "sub" / "b.jsonl").write_text("2 truncated")  # the second stage's store, damaged
    calls.clear()
    _, read, after = _demo(tmp_path, calls)
    # the second stage reran to the same result and files in another time, so the third's record still holds
    assert read == [True, False, True] and calls == ["second"] and after[2] < before[2]
    assert (tmp_path / "sub" / "b.jsonl").read_text() == "2"
    (tmp_path / "a.json").unlink()
    calls.clear()
    found, read, _ = _demo(tmp_path, calls, a=5)  # the first stage reran to another result: all after it rerun
    assert read == [False, False, False] and found == {"a": 5, "b": {"value": 6}, "c": 60}


def test_other_inputs_or_a_damaged_record_recompute(tmp_path: Path) -> None:
    calls: list[str] = []
    _demo(tmp_path, calls)
    calls.clear()
    _, read, _ = _demo(tmp_path, calls, inputs={**INPUTS, "settings": {"n_films": 8}})
    assert read == [False] * 3
    (tmp_path / "stages" / "02-second.pkl").write_bytes(b"not a pickle")
    calls.clear()
    _, read, _ = _demo(tmp_path, calls, inputs={**INPUTS, "settings": {"n_films": 8}})
    assert read == [True, False, True] and calls == ["second"]


def test_the_code_digest_covers_flipscopes_sources() -> None:
    digest = code_digest()
    assert len(digest) == 64 and digest == code_digest()


def test_a_moved_work_folder_runs_again(tmp_path: Path) -> None:
    """Stage results name paths in their folder: read back elsewhere they would point to the old one."""
    import shutil

    calls: list[str] = []
    _demo(tmp_path / "here", calls)
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    calls.clear()
    _, read, _ = _demo(tmp_path / "there", calls)
    assert read == [False] * 3 and calls == ["first", "second", "third"]
