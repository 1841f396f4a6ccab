"""Questions with paraphrases: the input of a flip evaluation.

JSONL schema, one question per line (fields beyond these are ignored)::

    {"id": "q0001",                       # unique, non-empty string
     "image": "p10/s50414267.png",        # path relative to the image root (or absolute)
     "finding": "pleural effusion",       # non-empty string
     "answer": "yes",                     # ground truth: "yes" or "no"
     "question": "Is there a pleural effusion?",
     "paraphrases": ["Do you see a pleural effusion?", "..."],   # at least one
     "strategies": ["lexical", "..."]}    # optional: one tag per paraphrase

The same table can come from a pandas DataFrame or an HF `datasets` table (`questions_from_table`),
with a column mapping for releases that name the fields differently. Every row is checked and all
problems are reported together (file:line, field, what was expected) before any model runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["FIELDS", "Question", "load_questions", "questions_from_table"]

FIELDS: tuple[str, ...] = ("id", "image", "finding", "answer", "question", "paraphrases", "strategies")


@dataclass(frozen=True)
class Question:
    """One question, its paraphrases and its image.

    Attributes:
        id: Unique id.
        image: Resolved path of the image file.
        finding: The finding asked about.
        answer: Ground truth, True for yes.
        question: The original wording.
        paraphrases: Meaning-preserving rewordings.
        strategies: Paraphrase strategy tag per paraphrase, or None.
    """

    id: str
    image: Path
    finding: str
    answer: bool
    question: str
    paraphrases: tuple[str, ...]
    strategies: tuple[str, ...] | None = None

    @property
    def prompts(self) -> tuple[str, ...]:
        """The original followed by the paraphrases (prompt index 0 is the original)."""
        return (self.question, *self.paraphrases)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_row(
    row: Any, where: str, image_root: Path | None, seen: dict[str, str]
) -> tuple[Question | None, list[str]]:
    if isinstance(row, _Malformed):
        return None, [f"{where}: not valid JSON ({row.reason})"]
    if not isinstance(row, Mapping):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    problems: list[str] = []

    def bad(field: str, expected: str) -> None:
        problems.append(f"{where}: field '{field}': expected {expected}, got {row.get(field)!r}")

    for field in ("id", "image", "finding", "question"):
        if not _nonempty_str(row.get(field)):
            bad(field, "a non-empty string")
    answer = row.get("answer")
    if not (isinstance(answer, str) and answer.strip().lower() in ("yes", "no")):
        bad("answer", "'yes' or 'no'")
    paraphrases = row.get("paraphrases")
    if not (isinstance(paraphrases, list) and paraphrases and all(_nonempty_str(p) for p in paraphrases)):
        bad("paraphrases", "a non-empty list of non-empty strings")
        paraphrases = None
    strategies = row.get("strategies")
    if strategies is not None:
        if not (isinstance(strategies, list) and all(_nonempty_str(s) for s in strategies)):
            bad("strategies", "a list of non-empty strings")
        elif paraphrases is not None and len(strategies) != len(paraphrases):
            bad("strategies", f"one tag per paraphrase ({len(paraphrases)})")
    qid = row.get("id")
    if _nonempty_str(qid):
        if qid in seen:
            problems.append(f"{where}: field 'id': duplicate id {qid!r} (first at {seen[qid]})")
        else:
            seen[qid] = where
    image = None
    if _nonempty_str(row.get("image")):
        image = Path(row["image"])
        if not image.is_absolute() and image_root is not None:
            image = image_root / image
        if not image.is_file():
            problems.append(f"{where}: field 'image': file {str(image)!r} does not exist")
    if problems:
        return None, problems
    return (
        Question(
            id=qid,
            image=image,
            finding=row["finding"],
            answer=answer.strip().lower() == "yes",
            question=row["question"],
            paraphrases=tuple(paraphrases),
            strategies=tuple(strategies) if strategies is not None else None,
        ),
        [],
    )


def _collect(rows: Iterable[tuple[str, Any]], image_root: Path | None) -> list[Question]:
    questions: list[Question] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        question, row_problems = _check_row(row, where, image_root, seen)
        problems.extend(row_problems)
        if question is not None:
            questions.append(question)
    if problems:
        shown = problems[:50]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise FlipscopeError(f"{len(problems)} problem(s) in the questions:\n" + "\n".join(shown) + more)
    if not questions:
        raise FlipscopeError("no questions found")
    return questions


def load_questions(path: str | Path, image_root: str | Path | None = None) -> list[Question]:
    """Read and validate a questions JSONL file (schema in the module docstring).

    Args:
        path: The JSONL file.
        image_root: Directory that relative image paths are resolved against (default: the
            file's directory).

    Raises:
        FlipscopeError: listing every bad line (file:line, field, expectation).
    """
    path = Path(path)
    if not path.is_file():
        raise FlipscopeError(f"questions file {str(path)!r} does not exist")
    root = Path(image_root) if image_root is not None else path.parent

    def rows() -> Iterable[tuple[str, Any]]:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as err:
                    yield where, _Malformed(str(err))

    return _collect(rows(), root)


class _Malformed:
    """A line that is not JSON (reported as such by the row check)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def questions_from_table(
    table: Any, image_root: str | Path | None = None, columns: Mapping[str, str] | None = None, name: str = "table"
) -> list[Question]:
    """Questions from a pandas DataFrame or an HF `datasets` table.

    Args:
        table: A pandas DataFrame, or anything iterable as row mappings (`datasets.Dataset`, a list).
        image_root: Directory for relative image paths.
        columns: flipscope field → column name, for fields named differently (e.g.
            `{"question": "original_question", "answer": "label"}`).
        name: How rows are named in error messages (`name:row`).
    """
    mapping = {field: field for field in FIELDS} | dict(columns or {})
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise FlipscopeError(f"column mapping names unknown fields {unknown}; fields are {list(FIELDS)}")
    records = table.to_dict("records") if hasattr(table, "iterrows") else table  # a DataFrame, else row dicts

    def rows() -> Iterable[tuple[str, Any]]:
        for index, record in enumerate(records):
            row = {field: record.get(column) for field, column in mapping.items()}
            for field in ("paraphrases", "strategies"):
                value = row[field]
                if value is not None and not isinstance(value, list | str) and hasattr(value, "__iter__"):
                    row[field] = list(value)
            yield f"{name}:{index}", row

    return _collect(rows(), Path(image_root) if image_root is not None else None)
