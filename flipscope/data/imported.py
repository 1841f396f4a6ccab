"""Imported answers as evaluation stores: one model's rows from an answer table, deduplicated, and
written in the store format `summarize`, `compare` and the report read (`flipscope import-answers`).

Rules (see `flipscope.data.answer_tables` for the reading): identical wordings of a question under
one condition are kept once, with a `count`, when their answers agree; when they disagree (a sampled
API answer), each answer stays as its own prompt, so the flip count equals a count of questions whose
answers changed. A wording without a yes/no answer drops out with its reason counted; a question
whose original has none with the image drops out whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipscope.data.answer_tables import TableQuestion, read_answer_table
from flipscope.data.atomic import write_atomic
from flipscope.data.store import store_text
from flipscope.errors import FlipscopeError

__all__ = ["ImportedRun", "build_run", "import_answers", "write_imported"]

ORDER = ("image", "blank", "none", "swap")  # the order conditions' units are written in


@dataclass
class ImportedRun:
    """One model's answers, as evaluation rows, and what the import left out."""

    model: str
    rows: list[dict[str, Any]]
    conditions: list[str]
    n_questions: int
    excluded: dict[str, int]
    deduplicated: int
    repeats_disagree: int


def build_run(model: str, questions: Mapping[str, TableQuestion]) -> ImportedRun:
    """One model's evaluation rows (module docstring: deduplication, exclusions)."""
    out: list[dict[str, Any]] = []
    excluded: dict[str, int] = {}
    deduplicated = disagree = n_questions = 0
    conditions = sorted({c for q in questions.values() for c in q.rows}, key=ORDER.index)
    for q in questions.values():
        image = q.rows.get("image", [])
        original = [r for r in image if r["is_original"]]
        if not original or original[0]["answer"] is None:
            excluded["question: no answered original with the image"] = (
                excluded.get("question: no answered original with the image", 0) + 1
            )
            continue
        n_questions += 1
        q.prompts[(original[0]["wording"], 0)] = 0
        for condition in conditions:
            rows = sorted(q.rows.get(condition, []), key=lambda r: (not r["is_original"], r["order"]))
            seen: dict[tuple[str, str], dict[str, Any]] = {}
            repeats: dict[str, int] = {}
            for r in rows:
                if r["answer"] is None:
                    key = f"wording: {r['reason']}"
                    excluded[key] = excluded.get(key, 0) + 1
                    continue
                if (r["wording"], r["answer"]) in seen:  # the same wording, the same answer: once, counted
                    seen[(r["wording"], r["answer"])]["count"] += 1
                    deduplicated += 1
                    continue
                repeat = repeats.get(r["wording"], 0)
                repeats[r["wording"]] = repeat + 1
                disagree += int(repeat > 0 and condition == "image")
                index = q.prompts.setdefault((r["wording"], repeat), len(q.prompts))
                truth = q.truth if q.truth is None or r["relation"] == "same" else {"yes": "no", "no": "yes"}[q.truth]
                row = {
                    "question_id": q.id, "finding": q.finding or "unspecified", "truth": truth,
                    "prompt_index": index, "kind": "original" if index == 0 else "paraphrase",
                    "strategy": None if index == 0 else r["strategy"], "condition": condition,
                    "margin": r["margin"], "p_yes": None, "entropy": None, "answer": r["answer"], "count": 1,
                    "prompt": r["wording"],
                }  # fmt: skip
                if index and r["relation"] == "inverted":
                    row["relation"] = "inverted"
                if r["margin"] is not None:
                    row.update(p_yes=_sigmoid(r["margin"]), entropy=_entropy_bits(r["margin"]))
                if r["text"] is not None:
                    row.update(generated=r["text"])
                seen[(r["wording"], r["answer"])] = row
                out.append(row)
    missing_truth = sorted({r["question_id"] for r in out if r["truth"] is None})
    if missing_truth:
        raise FlipscopeError(
            f"the answer table gives no truth for question {missing_truth[0]!r} (and {len(missing_truth) - 1} more); "
            "map a truth column with --map truth=COLUMN"
        )
    return ImportedRun(model, out, conditions, n_questions, excluded, deduplicated, disagree)


def _sigmoid(margin: float) -> float:
    return 1 / (1 + math.exp(-margin)) if margin >= 0 else math.exp(margin) / (1 + math.exp(margin))


def _entropy_bits(margin: float) -> float:
    """Entropy (bits) of the two-way answer, as `flipscope.model.answers.binary_entropy` computes it."""
    p = _sigmoid(margin)
    return -sum(x * math.log2(x) for x in (p, 1 - p) if x > 0)


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    """Digest of the questions an imported run answers: ids, truths and wordings by prompt index."""
    seen = sorted({(r["question_id"], r["prompt_index"], r["truth"], r["prompt"]) for r in rows})
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()


def write_imported(run: ImportedRun, path: str | Path, source: Mapping[str, Any], swap_match: str = "any") -> Path:
    """Write one imported run as an evaluation store (one unit per condition), atomically: a
    reader never sees half an import. `source` records the table (path, digest, mapping);
    `swap_match` what its `swap` rows showed (`opposite`: a film of the same finding with the
    other truth, as `flipscope evaluate --swap-match opposite` does)."""
    config: dict[str, Any] = {"conditions": run.conditions, "imported": True}
    if swap_match != "any":
        config["swap_match"] = swap_match
    header = {
        "kind": "flip-evaluation",
        "eval_config": config,
        "model": {"name": run.model, "imported": True},
        "questions": {"n": run.n_questions, "sha256": _fingerprint(run.rows)},
        "imported": {
            **source,
            "excluded": run.excluded,
            "deduplicated": run.deduplicated,
            "repeats_disagree": run.repeats_disagree,
        },  # fmt: skip
        "shard": None,
        "path": "imported",
    }
    units = {c: [r for r in run.rows if r["condition"] == c] for c in run.conditions}
    return write_atomic(path, store_text(header, units))


def import_answers(
    table: str | Path,
    out: str | Path,
    columns: Mapping[str, str] | None = None,
    *,
    model: str | None = None,
    swap_match: str = "any",
) -> dict[str, Path]:
    """Read an answer table and write one store per model: `out/results.jsonl` for one model,
    `out/<model>/results.jsonl` for several. Nothing is written when any row is malformed.
    `swap_match`: what the table's swap rows showed (`any` or `opposite`).

    Returns:
        model name → the store written.
    """
    if swap_match not in ("any", "opposite"):
        raise FlipscopeError(f"swap_match {swap_match!r} is unknown; expected 'any' or 'opposite'")
    read = read_answer_table(table, columns, model=model)
    runs = [build_run(name, questions) for name, questions in read.models.items()]
    digest = hashlib.sha256(Path(table).read_bytes()).hexdigest() if Path(table).is_file() else None
    source = {"table": str(table), "sha256": digest, "columns": read.columns}
    written = {}
    for run in runs:
        folder = Path(out) if len(runs) == 1 else Path(out) / re.sub(r"[^A-Za-z0-9._-]+", "_", run.model)
        folder.mkdir(parents=True, exist_ok=True)
        written[run.model] = write_imported(run, folder / "results.jsonl", source, swap_match)
    return written
