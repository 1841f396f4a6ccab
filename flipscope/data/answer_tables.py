"""Answer tables from models nobody can hook, read row by row and checked.

An API model (GPT-5-mini, Claude Haiku through a batch API) or a colleague's run arrives as a table,
one row per wording: which question, which wording (a variant index, 0 = the original, or the
wording itself beside the original's), and the answer — a yes/no value, or generated text that
flipscope's own keyword parser reads (hedges excluded) — with optional margin or p(yes), evidence
condition, truth, paraphrase family, relation (`same`/`inverted`, or PSF-Med's `op_match`) and
model name. `flipscope.data.imported` turns what is read into a store in the evaluation format,
so `summarize`, `compare` and the report read it like any run of `flipscope evaluate`.

The lab's phrasing-study layout is recognised without a mapping: `study_id, baseline_question,
ground_truth, variant_index, strategy, question, generated_text, extracted_answer` (or `answer`);
a question is a (study, baseline question) pair. Any other layout names its columns with
`columns` (field → column; `question_id` may join several columns with `+`).

A row whose answer is neither yes/no nor parses (a hedge, a refusal) is kept as unanswered, with
the parser's reason. Every malformed row is reported (file:line, field, column, what was
expected) before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flipscope.data.keywords import parse_answer
from flipscope.data.tables import flag, identifier, not_a_record, read_records, text
from flipscope.errors import FlipscopeError, problems_error

__all__ = ["CONDITIONS", "FIELDS", "LAB_LAYOUT", "AnswerTable", "TableQuestion", "read_answer_table"]

FIELDS: dict[str, str] = {
    "question_id": "the question's id (join columns with '+')",
    "variant": "the wording's index among its question's wordings (0 = the original)",
    "original": "the original wording (a row whose wording equals it is the original)",
    "wording": "the wording asked",
    "answer": "the answer: yes/no, or text the keyword parser reads",
    "generated": "the generated text (parsed when `answer` is absent or not yes/no)",
    "margin": "the yes-minus-no margin (log-odds)",
    "p_yes": "p(yes) of a two-way answer (read as its log-odds)",
    "condition": "the evidence shown: image, blank, none or swap",
    "truth": "the correct answer to the original (yes/no)",
    "finding": "what the question asks about",
    "strategy": "the paraphrase family",
    "relation": "same or inverted (or op_match: true/false)",
    "model": "the model's name (one store per model)",
}
LAB_LAYOUT: dict[str, str] = {
    "question_id": "study_id+baseline_question",
    "variant": "variant_index",
    "original": "baseline_question",
    "wording": "question",
    "answer": "extracted_answer",
    "generated": "generated_text",
    "truth": "ground_truth",
    "strategy": "strategy",
}
CONDITIONS = {
    "image": "image", "with_image": "image", "blank": "blank", "blank_image": "blank", "none": "none",
    "no_image": "none", "text_only": "none", "text": "none", "without_image": "none", "swap": "swap",
}  # fmt: skip
P_CLIP = 1e-7  # a probability of exactly 0 or 1 is read as ±16.1, not ±inf


@dataclass
class AnswerTable:
    """An answer table as read: the column mapping used, and per model its questions."""

    columns: dict[str, str]
    models: dict[str, dict[str, TableQuestion]]


@dataclass
class TableQuestion:
    """One question's wordings and answers as the table gives them."""

    id: str
    where: str
    truth: str | None = None
    finding: str | None = None
    original: str | None = None
    prompts: dict[tuple[str, int], int] = field(default_factory=dict)  # (wording, repeat) → prompt index
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # condition → rows


def _layout(columns: Iterable[str], mapping: Mapping[str, str] | None) -> dict[str, str]:
    """The column mapping: the lab's layout where the table has its columns, then the field names
    themselves where present, then `mapping` on top."""
    columns = set(columns)
    unknown = sorted(set(mapping or {}) - set(FIELDS))
    if unknown:
        raise FlipscopeError(f"column mapping names unknown fields {unknown}; fields are {list(FIELDS)}")
    out = {f: f for f in FIELDS if f in columns}
    if {"study_id", "baseline_question", "variant_index"} <= columns:
        out = {f: c for f, c in LAB_LAYOUT.items() if all(part in columns for part in c.split("+"))}
        if "extracted_answer" not in columns and "answer" in columns:
            out["answer"] = "answer"
        out |= {f: f for f in ("margin", "p_yes", "condition", "finding", "relation", "model") if f in columns}
    out |= dict(mapping or {})
    missing = [c for f, cols in out.items() for c in cols.split("+") if c not in columns]
    if missing:
        raise FlipscopeError(f"the table has no column {missing[0]!r} (columns: {sorted(columns)})")
    needs = [f for f in ("question_id", "wording") if f not in out] + (
        [] if {"answer", "generated", "margin", "p_yes"} & set(out) else ["answer, generated, margin or p_yes"]
    )
    if "variant" not in out and "original" not in out:
        needs.append("variant or original")
    if needs:
        raise FlipscopeError(
            f"the table's columns {sorted(columns)} do not give {', '.join(needs)}; map them with --map FIELD=COLUMN"
        )
    return out


def _get(record: Mapping[str, Any], column: str | None) -> Any:
    if column is None:
        return None
    if "+" in column:
        parts = [identifier(record.get(c)) for c in column.split("+")]
        return None if None in parts else " | ".join(parts)
    value = record.get(column)
    return None if isinstance(value, float) and math.isnan(value) else value


def _yes_no(value: Any) -> str | None:
    word = text(value)
    return word.lower() if word is not None and word.lower() in ("yes", "no") else None


def _margin(record: Mapping[str, Any], cols: Mapping[str, str], bad: Any) -> float | None:
    if (value := _get(record, cols.get("margin"))) is not None:
        try:
            margin = float(value)
        except (TypeError, ValueError):
            margin = math.nan
        if not math.isfinite(margin):
            bad("margin", "a finite number (a non-finite margin is no answer)", value)
            return None
        return margin
    if (value := _get(record, cols.get("p_yes"))) is not None:
        try:
            p = float(value)
        except (TypeError, ValueError):
            p = math.nan
        if not 0 <= p <= 1:
            bad("p_yes", "a probability in [0, 1]", value)
            return None
        p = min(max(p, P_CLIP), 1 - P_CLIP)
        return math.log(p / (1 - p))
    return None


def _answer(
    record: Mapping[str, Any], cols: Mapping[str, str], margin: float | None, bad: Any
) -> tuple[str | None, str]:
    """(yes/no or None, why) from the answer column, else the generated text, else the margin."""
    given, generated = _get(record, cols.get("answer")), _get(record, cols.get("generated"))
    answer, reason = _yes_no(given), "answer column"
    if answer is None and text(given) is not None:
        parsed = parse_answer(str(given))
        answer, reason = parsed.answer, parsed.reason
    if answer is None and text(generated) is not None:
        parsed = parse_answer(str(generated))
        answer, reason = parsed.answer, parsed.reason
    if answer is None and margin is not None and text(given) is None and text(generated) is None:
        answer, reason = ("yes" if margin > 0 else "no"), "margin"
    if answer is not None and margin is not None and (margin > 0) != (answer == "yes") and margin != 0:
        bad("margin", f"a sign that agrees with the answer {answer!r}", margin)
    return answer, reason if answer is None else "answered"


def _relation(value: Any) -> str | None:
    """`same`/`inverted` from a relation column, or from an op_match-style boolean (False: inverted)."""
    if value is None:
        return "same"
    word = text(value)
    if word is not None and word.lower() in ("same", "inverted"):
        return word.lower()
    truth = flag(value)
    return None if truth is None else ("same" if truth else "inverted")


def read_answer_table(
    source: Any, columns: Mapping[str, str] | None = None, *, model: str | None = None
) -> AnswerTable:
    """Each model's questions, wordings and answers from an answer table (module docstring).

    Args:
        source: A CSV, JSONL, JSON or Parquet file, a saved `datasets` folder, or a list of records.
        columns: flipscope field (`FIELDS`) → column, over the detected layout.
        model: The model's name when the table has no model column.

    Raises:
        FlipscopeError: every malformed row at once (file:line, field and column), or a table
            that gives no question id, wording or answer.
    """
    records = list(read_records(source))
    if not records:
        raise FlipscopeError(f"the answer table {source!s:.80} has no rows")
    first = next((r for _, r in records if isinstance(r, Mapping)), {})
    cols = _layout(first.keys(), columns)
    problems: list[str] = []
    by_model: dict[str, dict[str, TableQuestion]] = {}
    for where, record in records:
        if (problem := not_a_record(where, record, "row")) is not None:
            problems.append(problem)
            continue
        _read_row(where, record, cols, model, by_model, problems)
    if problems:
        raise problems_error("the answer table", problems)
    return AnswerTable(cols, by_model)


def _fields(record: Mapping[str, Any], cols: Mapping[str, str], model: str | None, bad: Any) -> dict[str, Any]:
    """One row's values, each checked (a bad one is reported through `bad`)."""
    qid, wording = identifier(_get(record, cols["question_id"])), text(_get(record, cols["wording"]))
    if qid is None:
        bad("question_id", "an id", _get(record, cols["question_id"]))
    if wording is None:
        bad("wording", "the wording asked", _get(record, cols["wording"]))
    raw_condition = text(_get(record, cols.get("condition"))) or "image"
    condition = CONDITIONS.get(raw_condition.lower())
    if condition is None:
        bad("condition", f"one of {sorted(CONDITIONS)}", raw_condition)
    variant = _get(record, cols.get("variant"))
    if "variant" in cols and not (re.fullmatch(r"\d+(\.0)?", str(variant).strip()) if variant is not None else False):
        bad("variant", "a wording index (0 = the original)", variant)
    truth = _get(record, cols.get("truth"))
    if truth is not None and _yes_no(truth) is None:
        bad("truth", "yes or no", truth)
    relation = _relation(_get(record, cols.get("relation")))
    if relation is None:
        bad("relation", "same or inverted (or op_match true/false)", _get(record, cols.get("relation")))
    name = text(str(_get(record, cols.get("model")) or "")) or model
    if name is None:
        bad("model", "a model name (a column, or --model)", None)
    margin = _margin(record, cols, bad)
    answer, reason = _answer(record, cols, margin, bad)
    return {"qid": qid, "wording": wording, "condition": condition, "variant": variant, "truth": _yes_no(truth),
            "relation": relation, "model": name, "margin": margin, "answer": answer, "reason": reason}  # fmt: skip


def _read_row(
    where: str,
    record: Mapping[str, Any],
    cols: Mapping[str, str],
    model: str | None,
    by_model: dict[str, dict[str, TableQuestion]],
    problems: list[str],
) -> None:
    before = len(problems)

    def bad(name: str, expected: str, got: Any) -> None:
        column = cols.get(name)
        problems.append(f"{where}: field '{name}' (column {column!r}): expected {expected}, got {repr(got)[:77]}")

    f = _fields(record, cols, model, bad)
    if len(problems) > before:
        return
    qid, wording = f["qid"], f["wording"]
    original_text = text(_get(record, cols.get("original")))
    is_original = int(float(f["variant"])) == 0 if "variant" in cols else wording == original_text
    q = by_model.setdefault(f["model"], {}).setdefault(qid, TableQuestion(id=qid, where=where))
    for attr, value in (("truth", f["truth"]), ("finding", text(_get(record, cols.get("finding"))))):
        if value is not None and getattr(q, attr) not in (None, value):
            first = getattr(q, attr)
            problems.append(f"{where}: question {qid!r} has {attr} {value!r} here but {first!r} at {q.where}")
            return
        if value is not None:
            setattr(q, attr, value)
    if is_original:
        if q.original not in (None, wording):
            problems.append(f"{where}: question {qid!r} has a second original wording (first at {q.where})")
            return
        q.original = wording
    q.rows.setdefault(f["condition"], []).append(
        {
            "wording": wording, "is_original": is_original, "answer": f["answer"], "reason": f["reason"],
            "margin": f["margin"], "relation": f["relation"], "strategy": text(_get(record, cols.get("strategy"))),
            "text": text(_get(record, cols.get("generated"))), "where": where,
            "order": int(float(f["variant"])) if "variant" in cols else (0 if is_original else 1),
        }
    )  # fmt: skip
