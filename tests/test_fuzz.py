"""Random and mutated questions files, FlipBanks and stores through the loaders: only success or a
`FlipscopeError` ever comes out (never a traceback of another type)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flipscope.data.flipbank import load_flipbank
from flipscope.data.questions import load_questions
from flipscope.data.store import ResultStore, read_rows
from flipscope.errors import FlipscopeError

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
QUESTION = json.loads((BANK.parent / "questions.jsonl").read_text().splitlines()[0])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _mutate(record: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """Delete, retype or replace some fields of a valid record."""
    record = dict(record)
    for key in data.draw(st.lists(st.sampled_from(sorted(record)), max_size=3)):
        action = data.draw(st.sampled_from(["delete", "value", "text"]))
        if action == "delete":
            record.pop(key, None)
        else:
            record[key] = data.draw(json_values if action == "value" else st.text(max_size=30))
    return record


def _only_flipscope_errors(load: Any, path: Path) -> None:
    try:
        load(path)
    except FlipscopeError:
        pass


@FUZZ
@given(data=st.data())
def test_questions_files(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / QUESTION["image"]).parent.mkdir(parents=True)
        (root / QUESTION["image"]).write_bytes((BANK.parent / QUESTION["image"]).read_bytes())
        kind = data.draw(st.sampled_from(["bytes", "json", "mutated"]))
        if kind == "bytes":
            body = data.draw(st.binary(max_size=300))
        elif kind == "json":
            body = json.dumps(data.draw(json_values)).encode() + b"\n"
        else:
            lines = [json.dumps(_mutate(QUESTION, data)) for _ in range(data.draw(st.integers(1, 3)))]
            body = "\n".join(lines).encode()
        (root / "q.jsonl").write_bytes(body)
        _only_flipscope_errors(load_questions, root / "q.jsonl")


@FUZZ
@given(data=st.data())
def test_flipbank_files(data: st.DataObject) -> None:
    bank = json.loads(BANK.read_text())
    bank = {**bank, "flips": bank["flips"][:2], "controls": bank["controls"][:2]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flipbank.json"
        kind = data.draw(st.sampled_from(["bytes", "json", "bank", "case"]))
        if kind == "bytes":
            path.write_bytes(data.draw(st.binary(max_size=300)))
        elif kind == "json":
            path.write_text(json.dumps(data.draw(json_values)))
        elif kind == "bank":
            path.write_text(json.dumps(_mutate(bank, data)))
        else:
            which = data.draw(st.sampled_from(["flips", "controls"]))
            bank[which] = [_mutate(case, data) for case in bank[which]]
            path.write_text(json.dumps(bank))
        _only_flipscope_errors(lambda p: load_flipbank(p, image_root=BANK.parent), path)


@FUZZ
@given(data=st.data())
def test_store_files(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.jsonl"
        with ResultStore.open(path, {"model": "fuzz"}) as store:
            for unit in range(3):
                store.append(f"u{unit}", [{"question_id": f"q{unit}", "margin": 0.5}] * 2)
        lines = path.read_bytes().splitlines(keepends=True)
        at = data.draw(st.integers(0, len(lines) - 1))
        lines[at] = data.draw(st.binary(max_size=80) | st.just(json.dumps(data.draw(json_values)).encode() + b"\n"))
        path.write_bytes(b"".join(lines))
        _only_flipscope_errors(read_rows, path)
        _only_flipscope_errors(lambda p: ResultStore.open(p, {"model": "fuzz"}).close(), path)
