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
`either`, or `off`. Every malformed record is reported (file:line, field, what was expected)
before anything is returned.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError, problems_error

__all__ = ["YESNO", "psfmed_rows", "read_records", "resolve_images"]

YESNO = ("regex", "claude", "both", "either", "off")
_TRUE = {"true", "1", "yes", "t"}
_FALSE = {"false", "0", "no", "f"}


def read_records(source: Any) -> Iterator[tuple[str, Any]]:
    """`(file:line, record)` for every record of a JSON, JSONL, CSV or Parquet file, a folder a
    `datasets` table was saved to (`save_to_disk`), or a `datasets.Dataset` itself (a record that
    is not an object, or a line that is not JSON, comes back as a string saying why)."""
    if not isinstance(source, str | Path):  # a datasets.Dataset, or any sequence of row mappings
        name = getattr(getattr(source, "info", None), "dataset_name", None) or type(source).__name__
        for index, row in enumerate(source):
            yield f"{name}:row {index}", row
        return
    path = Path(source)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as err:
            raise FlipscopeError(f"{path} is a folder; reading a saved datasets table needs `datasets`") from err
        yield from read_records(load_from_disk(str(path)))
        return
    if not path.is_file():
        raise FlipscopeError(f"PSF-Med file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield f"{path}:{number}", dict(row)
    elif suffix == ".parquet":
        import pandas as pd

        for index, row in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{path}:row {index}", row
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:{number}", _json(line)
    elif suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"))
        records = data.get("results") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise FlipscopeError(f"{path}: expected a JSON list of records, or an object with a 'results' list")
        for index, record in enumerate(records):
            yield f"{path}:record {index}", record
    else:
        raise FlipscopeError(f"{path}: unknown format {suffix!r}; expected .json, .jsonl, .csv or .parquet")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err})"


def _flag(value: Any) -> bool | None:
    """A boolean column as CSV, Parquet or JSON writes it (None when absent or unreadable)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


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
    }[yesno]


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _id(value: Any) -> str | None:
    """An id or image name as any format writes it (an int from JSON or Parquet), None when absent."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and value != value):  # NaN: empty
        return None
    return _text(str(value))


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
        if not isinstance(record, Mapping):
            got = record if isinstance(record, str) else type(record).__name__
            problems.append(f"{where}: expected a record (an object), got {got}")
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
