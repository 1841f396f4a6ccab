"""PSF-Med records, in the two layouts its authors write, read as flipscope question rows.

**Nested records** (the MIMIC splits; a JSON list, a JSON object holding the list under
`"results"`, or JSONL): `question_id`, `original_question`, `answer` (yes/no, any case),
`question_type`, `filename` (an image file name), `paraphrases` (a list of `{text, phenomenon}`),
and in v2.1 `is_yesno` / `is_yesno_claude` on the question and on each paraphrase.

**Pair rows** (the PadChest and VinDr flip banks; CSV, Parquet or JSONL): one row per question and
paraphrase, `question_id`, `image_path` or `image_id`, `original_question`, `paraphrase`,
`phenomenon`, `ground_truth` (yes/no) and `op_match`: False on an answer-inverting paraphrase
(`negation_pattern`), whose correct answer is the opposite of the original's.

Both become the same rows: `id`, `image`, `finding` (the question type), `answer`, `question`,
`paraphrases`, `strategies` (the phenomena, so every table breaks flips down by them) and
`relations` (`"same"` or `"inverted"` per paraphrase). The yes/no filter keeps questions and
paraphrases by the release's flags: `regex` (`is_yesno`), `claude` (`is_yesno_claude`), `both`,
`either` (or `any`), or `off`. Every malformed record is reported (file:line, field, what was expected)
before anything is returned.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_atomic
from flipscope.data.questions import questions_from_table
from flipscope.data.tables import flag as _flag
from flipscope.data.tables import identifier as _id
from flipscope.data.tables import not_a_record, read_records
from flipscope.data.tables import text as _text
from flipscope.errors import FlipscopeError, problems_error

__all__ = ["YESNO", "psfmed_rows", "read_records", "resolve_images", "write_questions"]

YESNO = ("regex", "claude", "both", "either", "any", "off")  # any: the same as either


def _keep(record: Mapping[str, Any], yesno: str, prefix: str = "") -> bool:
    """Whether the release's yes/no flags keep this question or paraphrase (`prefix` picks the
    paraphrase's own flags in a pair row); a record without the flags is kept."""
    regex, claude = _flag(record.get(f"{prefix}is_yesno")), _flag(record.get(f"{prefix}is_yesno_claude"))
    if yesno == "off" or (regex is None and claude is None):
        return True
    return {
        "regex": regex is not False,
        "claude": claude is not False,
        "both": regex is not False and claude is not False,
        "either": bool(regex) or bool(claude),
        "any": bool(regex) or bool(claude),
    }[yesno]


def _answer(value: Any) -> str | None:
    text = _text(value)
    return text.lower() if text is not None and text.lower() in ("yes", "no") else None


def _nested(where: str, record: Mapping[str, Any], yesno: str, bad: Any) -> dict[str, Any] | None:
    """One question row from a nested record."""
    qid, question = _id(record.get("question_id")), _text(record.get("original_question"))
    answer, image = _answer(record.get("answer")), _text(record.get("filename"))
    checks = (
        ("question_id", qid, "an id"),
        ("original_question", question, "the wording"),
        ("answer", answer, "yes or no (any case)"),
        ("filename", image, "an image file"),
    )
    for field, value, expected in checks:
        if value is None:
            bad(where, field, expected, record.get(field))
    paraphrases = record.get("paraphrases")
    wellformed = isinstance(paraphrases, list) and all(
        isinstance(p, Mapping) and _text(p.get("text")) for p in paraphrases
    )
    if not wellformed:
        bad(where, "paraphrases", "a list of {text, phenomenon}", paraphrases)
        return None
    if None in (qid, question, answer, image) or not _keep(record, yesno):
        return None
    kept = [p for p in paraphrases if _keep(p, yesno)]
    return {
        "id": qid, "image": image, "finding": _text(record.get("question_type")) or "unknown", "answer": answer,
        "question": question, "paraphrases": [p["text"].strip() for p in kept],
        "strategies": [_text(p.get("phenomenon")) or "unknown" for p in kept], "relations": ["same"] * len(kept),
        "source": where, "subject_id": record.get("subject_id"), "study_id": record.get("study_id"),
    }  # fmt: skip


def _pair(where: str, record: Mapping[str, Any], bad: Any) -> dict[str, Any] | None:
    """One question–paraphrase pair from a pair row (None where a field is bad)."""
    image = _id(record.get("image_path")) or _id(record.get("image_id"))
    row = {
        "question_id": _id(record.get("question_id")),
        "original_question": _text(record.get("original_question")),
        "paraphrase": _text(record.get("paraphrase")),
        "ground_truth": _answer(record.get("ground_truth")),
        "op_match": _flag(record.get("op_match", True)),
    }
    expected = {"question_id": "an id", "original_question": "the wording", "paraphrase": "the paraphrase",
                "ground_truth": "yes or no (any case)", "op_match": "true or false"}  # fmt: skip
    for field, value in row.items():
        if value is None:
            bad(where, field, expected[field], record.get(field))
    if image is None:
        bad(where, "image_path", "an image path (or image_id)", record.get("image_path"))
    if None in row.values() or image is None:
        return None
    return row | {"image": image, "phenomenon": _text(record.get("phenomenon")) or "unknown",
                  "type": _text(record.get("question_type")) or "unknown"}  # fmt: skip


def psfmed_rows(records: Iterable[tuple[str, Any]], *, yesno: str = "off") -> list[dict[str, Any]]:
    """Question rows (module docstring) from `(where, record)` pairs of either layout (told apart
    record by record: a `paraphrases` list is nested, a `paraphrase` string a pair row).

    Raises:
        FlipscopeError: an unknown `yesno`, or every malformed record at once (file:line, field).
    """
    if yesno not in YESNO:
        raise FlipscopeError(f"yes/no filter {yesno!r} is unknown; expected one of {YESNO}")
    problems: list[str] = []

    def bad(where: str, field: str, expected: str, got: Any) -> None:
        shown = repr(got)
        problems.append(f"{where}: field '{field}': expected {expected}, got {shown[:77]}")

    questions: dict[str, dict[str, Any]] = {}
    for where, record in records:
        if (problem := not_a_record(where, record)) is not None:
            problems.append(problem)
            continue
        if "paraphrases" in record:
            row = _nested(where, record, yesno, bad)
            if row is not None:
                questions[row["id"]] = row
            continue
        pair = _pair(where, record, bad)
        if pair is None or not _keep(record, yesno) or not _keep(record, yesno, "paraphrase_"):
            continue
        row = questions.setdefault(pair["question_id"], {
            "id": pair["question_id"], "image": pair["image"], "finding": pair["type"],
            "answer": pair["ground_truth"], "question": pair["original_question"], "paraphrases": [],
            "strategies": [], "relations": [], "source": where,
        })  # fmt: skip
        if (row["question"], row["answer"], row["image"]) != (
            pair["original_question"], pair["ground_truth"], pair["image"]
        ):  # fmt: skip
            problems.append(
                f"{where}: question {pair['question_id']!r} differs from its first row ({row['source']}) in its "
                "wording, truth or image"
            )
            continue
        if pair["paraphrase"] not in row["paraphrases"]:
            row["paraphrases"].append(pair["paraphrase"])
            row["strategies"].append(pair["phenomenon"])
            row["relations"].append("same" if pair["op_match"] else "inverted")
    if problems:
        raise problems_error("the PSF-Med records", problems)
    rows = [row for row in questions.values() if row["paraphrases"]]
    if not rows:
        raise FlipscopeError("no PSF-Med question with a paraphrase is left (check the yes/no filter)")
    return rows


def resolve_images(rows: list[dict[str, Any]], root: str | Path) -> list[dict[str, Any]]:
    """`rows` with each image found under `root`: as given, under `images/`, or by the MIMIC-CXR
    layout `files/p{first 2 digits}/p{subject_id}/s{study_id}/{file}` where a row carries
    `subject_id` and `study_id`.

    Raises:
        FlipscopeError: listing every image not found (file:line of its record, and where it looked).
    """
    root = Path(root)
    missing, out = [], []
    for row in rows:
        name = row["image"]
        tried = [root / name, root / "images" / name]
        subject, study = row.get("subject_id"), row.get("study_id")
        if subject is not None and study is not None:
            subject = str(subject).removeprefix("p")
            stem = name if Path(name).suffix else f"{name}.jpg"
            tried.append(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{str(study).removeprefix('s')}" / stem)
        found = next((path for path in tried if path.is_file()), None)
        if found is None:
            missing.append(f"{row['source']}: image {name!r} not found (looked for {', '.join(map(str, tried))})")
        else:
            out.append(row | {"image": str(found)})
    if missing:
        raise problems_error("the PSF-Med images", missing)
    return out


def write_questions(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write question rows (after `resolve_images`) as a flipscope questions JSONL file, atomically,
    with each image path relative to the file's folder where it lies under it. The rows are first
    checked by the questions loader itself, so the file written is one `load_questions` reads.

    Raises:
        FlipscopeError: every row the questions loader refuses (named by its PSF-Med record).
    """
    path = Path(path)
    folder = path.parent.resolve()
    keep = ("id", "image", "finding", "answer", "question", "paraphrases", "strategies", "relations")
    out = []
    for row in rows:
        image = Path(row["image"]).resolve()
        shown = image.relative_to(folder) if image.is_relative_to(folder) else image
        out.append({k: row[k] for k in keep if k in row} | {"image": str(shown)})
    problems = []
    for row, checked in zip(out, rows, strict=True):  # the loader's own checks, named by the record
        try:
            questions_from_table([row], image_root=folder, name=checked["source"])
        except FlipscopeError as err:
            problems.append(str(err).removeprefix("the questions: "))
    if problems:
        raise problems_error("the converted questions", problems)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in out))
    return path
