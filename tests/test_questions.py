"""The questions loader: valid input loads; every bad row is reported with file:line and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flipscope.data.questions import load_questions, questions_from_table
from flipscope.errors import FlipscopeError


def _row(qid: str, **overrides) -> dict:
    row = {
        "id": qid,
        "image": "films/a.png",
        "finding": "effusion",
        "answer": "yes",
        "question": "Is there a pleural effusion?",
        "paraphrases": ["Do you see a pleural effusion?", "Is a pleural effusion present?"],
        "strategies": ["lexical", "syntactic"],
    }
    row.update(overrides)
    return row


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "films").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "films" / "a.png")
    return tmp_path


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_valid_file_loads(root: Path) -> None:
    path = _write(root / "q.jsonl", [_row("q1"), _row("q2", answer="No", strategies=None)])
    questions = load_questions(path)
    assert [q.id for q in questions] == ["q1", "q2"]
    assert questions[0].image == root / "films" / "a.png" and questions[0].answer is True
    assert questions[1].answer is False and questions[1].strategies is None
    assert questions[0].prompts[0] == "Is there a pleural effusion?" and len(questions[0].prompts) == 3


def test_every_bad_row_is_reported(root: Path) -> None:
    path = _write(
        root / "bad.jsonl",
        [
            _row("q1"),
            '{"id": "q2", "image": ',
            _row("q3", image="films/missing.png"),
            _row("q4", paraphrases=[]),
            _row("q1"),
            _row("q5", answer="maybe"),
            _row("q6", strategies=["lexical"]),
        ],
    )
    with pytest.raises(FlipscopeError) as info:
        load_questions(path)
    message = str(info.value)
    assert message.startswith("6 problems in the questions:")
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: field 'image': file" in message and "missing.png' does not exist" in message
    assert f"{path}:4: field 'paraphrases': expected a non-empty list" in message
    assert f"{path}:5: field 'id': duplicate id 'q1' (first at {path}:1)" in message
    assert f"{path}:6: field 'answer': expected 'yes' or 'no', got 'maybe'" in message
    assert f"{path}:7: field 'strategies': expected one tag per paraphrase (2)" in message


def test_missing_file_and_empty_file(root: Path) -> None:
    with pytest.raises(FlipscopeError, match="does not exist"):
        load_questions(root / "nope.jsonl")
    (root / "empty.jsonl").write_text("\n")
    with pytest.raises(FlipscopeError, match="no questions found in questions file .*empty.jsonl"):
        load_questions(root / "empty.jsonl")


def test_dataframe_and_datasets_with_column_mapping(root: Path) -> None:
    import datasets
    import pandas as pd

    records = [
        {
            "qid": f"q{i}",
            "image": "films/a.png",
            "finding": "effusion",
            "label": "no",
            "original_question": "Is there a pleural effusion?",
            "paraphrases": ["Do you see a pleural effusion?"],
        }
        for i in range(3)
    ]
    columns = {"id": "qid", "answer": "label", "question": "original_question"}
    from_frame = questions_from_table(pd.DataFrame(records), image_root=root, columns=columns)
    from_hf = questions_from_table(datasets.Dataset.from_list(records), image_root=root, columns=columns)
    assert from_frame == from_hf
    assert [q.id for q in from_frame] == ["q0", "q1", "q2"] and not from_frame[0].answer
    with pytest.raises(FlipscopeError, match="frame:1: field 'answer'"):
        bad = [dict(r) for r in records]
        bad[1]["label"] = "unsure"
        questions_from_table(pd.DataFrame(bad), image_root=root, columns=columns, name="frame")
    with pytest.raises(FlipscopeError, match="unknown fields \\['label'\\]"):
        questions_from_table(records, columns={"label": "answer"})
