"""Questions with paraphrases: the input of a flip evaluation.

JSONL schema, one question per line (fields beyond these are ignored)::

    {"id": "q0001",                       # unique, non-empty string
     "image": "p10/s50414267.png",        # path relative to the image root (or absolute)
     "finding": "pleural effusion",       # non-empty string
     "answer": "yes",                     # ground truth: "yes" or "no"
     "question": "Is there a pleural effusion?",
     "paraphrases": ["Do you see a pleural effusion?", "..."],   # at least one
     "strategies": ["lexical", "..."],    # optional: one tag per paraphrase
     "relations": ["same", "inverted"]}   # optional: each paraphrase's expected answer relation

A paraphrase whose relation is `inverted` (e.g. "Is the lung field clear of effusion?" for "Is there
an effusion?") has the opposite correct answer: an answer flips when it breaks its paraphrase's
relation to the original's, and the paraphrase's own truth is the original's inverted.

For a text model (the `gemma3_text` family, e.g. MedGemma 27B text) the evidence is a passage
instead of an image: a `context` field (e.g. the report) takes the place of `image`. Each row
needs one of them; a row may carry both.

The same table can come from a pandas DataFrame or an HF `datasets` table (`questions_from_table`),
with a column mapping for releases that name the fields differently. Every row is checked and all
problems are reported together (file:line, field, what was expected) before any model runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError, problems_error

__all__ = ["FIELDS", "RELATIONS", "Question", "load_questions", "questions_from_table"]

FIELDS: tuple[str, ...] = (
    "id", "image", "context", "finding", "answer", "question", "paraphrases", "strategies", "relations"
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("same", "inverted")
MAX_CONTEXT_CHARS = 50_000  # a report passage
MAX_TEXT_CHARS = 2000  # per question or paraphrase: far above any clinical question, far below a context
MAX_LINE_BYTES = 1 << 20  # per JSONL line


@dataclass(frozen=True)
class Question:
    """One question, its paraphrases and its image.

    Attributes:
        id: Unique id.
        image: Resolved path of the image file (None for a text-only question).
        finding: The finding asked about.
        answer: Ground truth, True for yes.
        question: The original wording.
        paraphrases: Meaning-preserving rewordings.
        strategies: Paraphrase strategy tag per paraphrase, or None.
        source: Where it was read (`file:line`), for errors found later (its image, its prompts).
        context: The text passage a text model is shown (e.g. the report), or None.
        relations: Per paraphrase, `same` or `inverted` (its correct answer is the original's
            opposite); None when every paraphrase keeps the answer.
    """

    id: str
    image: Path | None
    finding: str
    answer: bool
    question: str
    paraphrases: tuple[str, ...]
    strategies: tuple[str, ...] | None = None
    source: str = dataclasses.field(default="", compare=False)
    context: str | None = None
    relations: tuple[str, ...] | None = None

    def inverted(self, prompt_index: int) -> bool:
        """Whether prompt `prompt_index`'s correct answer is the opposite of the original's."""
        return bool(prompt_index and self.relations and self.relations[prompt_index - 1] == "inverted")

    def truth(self, prompt_index: int) -> bool:
        """The correct answer (True: yes) to prompt `prompt_index` (0 = the original)."""
        return self.answer != self.inverted(prompt_index)

    @property
    def prompts(self) -> tuple[str, ...]:
        """The original followed by the paraphrases (prompt index 0 is the original)."""
        return (self.question, *self.paraphrases)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_problem(value: Any) -> str | None:
    """Why a question or paraphrase text is unusable, or None."""
    if not _nonempty_str(value):
        return "a non-empty string"
    if len(value) > MAX_TEXT_CHARS:
        return f"at most {MAX_TEXT_CHARS} characters (a question, not a document)"
    return None


def _wordings(row: Mapping[str, Any], bad: Any) -> tuple[list[str] | None, list[str] | None, list[str] | None]:
    """The row's paraphrases, strategy tags and relations, checked (None where bad, reported through `bad`)."""
    paraphrases = row.get("paraphrases")
    if not (isinstance(paraphrases, list) and paraphrases and all(_nonempty_str(p) for p in paraphrases)):
        bad("paraphrases", "a non-empty list of non-empty strings")
        paraphrases = None
    elif any(len(p) > MAX_TEXT_CHARS for p in paraphrases):
        bad("paraphrases", f"strings of at most {MAX_TEXT_CHARS} characters")
        paraphrases = None
    strategies = row.get("strategies")
    if strategies is not None:
        if not (isinstance(strategies, list) and all(_nonempty_str(s) for s in strategies)):
            bad("strategies", "a list of non-empty strings")
            strategies = None
        elif paraphrases is not None and len(strategies) != len(paraphrases):
            bad("strategies", f"one tag per paraphrase ({len(paraphrases)})")
    relations = row.get("relations")
    if relations is not None:
        if not (isinstance(relations, list) and all(r in RELATIONS for r in relations)):
            bad("relations", "a list of 'same' or 'inverted'")
            relations = None
        elif paraphrases is not None and len(relations) != len(paraphrases):
            bad("relations", f"one relation per paraphrase ({len(paraphrases)})")
    return paraphrases, strategies, relations


def _check_row(
    row: Any, where: str, image_root: Path | None, seen: dict[str, str]
) -> tuple[Question | None, list[str]]:
    if isinstance(row, _Malformed):
        return None, [f"{where}: not valid JSON ({row.reason})"]
    if not isinstance(row, Mapping):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    problems: list[str] = []

    def bad(field: str, expected: str) -> None:
        got = repr(row.get(field))
        problems.append(
            f"{where}: field '{field}': expected {expected}, got {got if len(got) <= 80 else got[:77] + '...'}"
        )

    for name in ("id", "finding"):
        if not _nonempty_str(row.get(name)):
            bad(name, "a non-empty string")
    context = row.get("context")
    if context is not None and not (_nonempty_str(context) and len(context) <= MAX_CONTEXT_CHARS):
        bad("context", f"a non-empty string of at most {MAX_CONTEXT_CHARS} characters (the text evidence)")
    if not _nonempty_str(row.get("image")) and (context is None or "image" in row):
        bad("image", "a non-empty string (or a 'context' passage for a text model)")
    if (why := _text_problem(row.get("question"))) is not None:
        bad("question", why)
    answer = row.get("answer")
    if not (isinstance(answer, str) and answer.strip().lower() in ("yes", "no")):
        bad("answer", "'yes' or 'no'")
    paraphrases, strategies, relations = _wordings(row, bad)
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
            source=where,
            context=context,
            relations=tuple(relations) if relations is not None and "inverted" in relations else None,
        ),
        [],
    )


def _collect(rows: Iterable[tuple[str, Any]], image_root: Path | None, empty: str) -> list[Question]:
    """Every row checked (all problems listed at once); `empty`: the error when there is no row."""
    questions: list[Question] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        question, row_problems = _check_row(row, where, image_root, seen)
        problems.extend(row_problems)
        if question is not None:
            questions.append(question)
    if problems:
        raise problems_error("the questions", problems)
    if not questions:
        raise FlipscopeError(empty)
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
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    yield where, _Malformed(f"{len(raw)} bytes; a line holds at most {MAX_LINE_BYTES}")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield where, _Malformed(f"not UTF-8 text ({err.reason} at byte {err.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except (json.JSONDecodeError, RecursionError) as err:
                    yield where, _Malformed(str(err) if isinstance(err, json.JSONDecodeError) else "nested too deeply")

    empty = f"no questions found in questions file {str(path)!r}: expected one JSON object per line"
    return _collect(rows(), root, empty)


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
            for field in ("paraphrases", "strategies", "relations"):
                value = row[field]
                if value is not None and not isinstance(value, list | str) and hasattr(value, "__iter__"):
                    row[field] = list(value)
            yield f"{name}:{index}", row

    root = Path(image_root) if image_root is not None else None
    return _collect(rows(), root, f"no questions found in {name}: it has no rows")
