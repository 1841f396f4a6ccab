"""FlipBank: the curated flip cases every later stage runs on, with matched non-flip controls.

A FlipBank is one JSON file (`"format": "flipbank/1"`) holding the curation rules that made it,
the model and evaluation it came from, and two lists of cases: `flips` (the paraphrase changes the
answer with the image) and `controls` (a paraphrase of a question in the same set that does not).
Each case: id, question_id, image, finding, truth, original, paraphrase, prompt_index, strategy,
answer/margin of the original and of the paraphrase, and (flips only) direction `yes→no` or `no→yes`.

Curation (`curate`) follows the paper's rules as options: the answer changes; both answers are
confident (|margin| ≥ `min_margin`; with parsed generated answers, both parse without hedges);
optionally a paraphrase-similarity threshold when rows carry a `similarity` column. Controls are
drawn from the same questions, deterministically (seeded), up to one per flip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flipscope.errors import FlipscopeError
from flipscope.questions import Question

__all__ = ["CurationRules", "FLIPBANK_FORMAT", "check_flipbank_model", "curate", "load_flipbank", "save_flipbank"]

FLIPBANK_FORMAT = "flipbank/1"
_CASE_FIELDS = {
    "id": str,
    "question_id": str,
    "image": str,
    "finding": str,
    "truth": str,
    "original": str,
    "paraphrase": str,
    "prompt_index": int,
    "original_answer": str,
    "paraphrase_answer": str,
    "original_margin": float,
    "paraphrase_margin": float,
}


@dataclass(frozen=True, kw_only=True)
class CurationRules:
    """How flip cases are chosen.

    Attributes:
        min_margin: Both margins at least this far from 0 (the answers are confident).
        use_generated: Require both generated answers to parse without hedges, and to flip.
        min_similarity: Keep only paraphrases with `similarity` ≥ this (rows must carry it).
        controls_per_flip: Non-flip controls drawn per flip case (from the same questions).
        seed: Seed of the control draw.
    """

    min_margin: float = 0.0
    use_generated: bool = False
    min_similarity: float | None = None
    controls_per_flip: int = 1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _case(q: Question, original: Mapping[str, Any], para: Mapping[str, Any]) -> dict[str, Any]:
    case = {
        "id": f"{q.id}/p{para['prompt_index']}",
        "question_id": q.id,
        "image": str(q.image),
        "finding": q.finding,
        "truth": "yes" if q.answer else "no",
        "original": q.question,
        "paraphrase": q.prompts[para["prompt_index"]],
        "prompt_index": int(para["prompt_index"]),
        "strategy": para.get("strategy"),
        "original_answer": original["answer"],
        "paraphrase_answer": para["answer"],
        "original_margin": float(original["margin"]),
        "paraphrase_margin": float(para["margin"]),
    }
    if case["original_answer"] != case["paraphrase_answer"]:
        case["direction"] = f"{case['original_answer']}→{case['paraphrase_answer']}"
    return case


def curate(
    rows: Sequence[Mapping[str, Any]],
    questions: Sequence[Question],
    rules: CurationRules,
    *,
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """A FlipBank from evaluation rows (with-image condition) by `rules`; `source` records the
    model and evaluation (e.g. the store header)."""
    by_id = {q.id: q for q in questions}
    image_rows = [r for r in rows if r["condition"] == "image"]
    originals = {r["question_id"]: r for r in image_rows if r["prompt_index"] == 0}
    flips, candidates = [], []
    for row in sorted(image_rows, key=lambda r: (r["question_id"], r["prompt_index"])):
        if row["prompt_index"] == 0 or row["question_id"] not in by_id:
            continue
        original = originals[row["question_id"]]
        answer_key = "parsed" if rules.use_generated else "answer"
        a, b = original.get(answer_key), row.get(answer_key)
        if a is None or b is None:
            continue
        if min(abs(original["margin"]), abs(row["margin"])) < rules.min_margin:
            continue
        if rules.min_similarity is not None:
            if "similarity" not in row:
                raise FlipscopeError("min_similarity needs a 'similarity' value on every row")
            if row["similarity"] < rules.min_similarity:
                continue
        case = _case(by_id[row["question_id"]], original, row)
        (flips if a != b else candidates).append(case)
    flipped_questions = {c["question_id"] for c in flips}
    pool = [c for c in candidates if c["question_id"] in flipped_questions] or candidates
    rng = np.random.default_rng(rules.seed)
    n_controls = min(len(pool), len(flips) * rules.controls_per_flip)
    controls = [pool[i] for i in sorted(rng.choice(len(pool), size=n_controls, replace=False))] if n_controls else []
    return {
        "format": FLIPBANK_FORMAT,
        "rules": rules.to_dict(),
        "source": dict(source),
        "n_flips": len(flips),
        "n_controls": len(controls),
        "flips": flips,
        "controls": controls,
    }


def _relative_images(bank: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The bank with every image under `root` written relative to it (so the folder can move)."""
    root = root.resolve()

    def rel(case: Mapping[str, Any]) -> dict[str, Any]:
        image = Path(case["image"]).resolve()
        return {**case, "image": image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)}

    return {**bank, "flips": [rel(c) for c in bank["flips"]], "controls": [rel(c) for c in bank["controls"]]}


def save_flipbank(bank: Mapping[str, Any], path: str | Path) -> Path:
    """Write a FlipBank (validated first, so a bad bank is never written); images inside the
    bank's folder are written relative to it."""
    _validate(bank, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_relative_images(bank, path.parent), indent=1, ensure_ascii=False) + "\n")
    return path


def _validate(bank: Mapping[str, Any], where: str, image_root: Path | None = None) -> None:
    problems: list[str] = []
    if bank.get("format") != FLIPBANK_FORMAT:
        problems.append(f"{where}: format {bank.get('format')!r}; expected {FLIPBANK_FORMAT!r}")
    for kind in ("flips", "controls"):
        cases = bank.get(kind)
        if not isinstance(cases, list):
            problems.append(f"{where}: '{kind}' is not a list")
            continue
        for index, case in enumerate(cases):
            label = f"{where}: {kind}[{index}]" + (f" ({case.get('id')})" if isinstance(case, Mapping) else "")
            if not isinstance(case, Mapping):
                problems.append(f"{label}: not an object")
                continue
            for field, kind_type in _CASE_FIELDS.items():
                value = case.get(field)
                ok = (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    if kind_type is float
                    else isinstance(value, kind_type)
                )
                if not ok or (kind_type is float and not np.isfinite(value)):
                    problems.append(f"{label}: field '{field}': expected {kind_type.__name__}, got {value!r}")
            for field in ("original_answer", "paraphrase_answer", "truth"):
                if case.get(field) not in ("yes", "no"):
                    problems.append(f"{label}: field '{field}': expected 'yes' or 'no', got {case.get(field)!r}")
            flipped = case.get("original_answer") != case.get("paraphrase_answer")
            if flipped != (kind == "flips"):
                problems.append(f"{label}: answers {'differ' if flipped else 'agree'}, so it is not a {kind[:-1]} case")
            if image_root is not None and isinstance(case.get("image"), str):
                image = Path(case["image"]) if Path(case["image"]).is_absolute() else image_root / case["image"]
                if not image.is_file():
                    problems.append(f"{label}: field 'image': file {str(image)!r} does not exist")
    if problems:
        raise FlipscopeError(f"{len(problems)} problem(s) in the FlipBank:\n" + "\n".join(problems[:50]))


def load_flipbank(path: str | Path, image_root: str | Path | None = None) -> dict[str, Any]:
    """Read and validate a FlipBank; every bad case is listed. Relative image paths come back
    resolved against `image_root` (default: the bank's folder).

    Raises:
        FlipscopeError: the file is unreadable or a case is bad (field, value, why).
    """
    path = Path(path)
    try:
        bank = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FlipscopeError(f"cannot read FlipBank {str(path)!r}: {err}") from err
    root = Path(image_root) if image_root is not None else path.parent
    _validate(bank, str(path), root)
    for case in (*bank["flips"], *bank["controls"]):
        image = Path(case["image"])
        case["image"] = str(image if image.is_absolute() else root / image)
    return bank


def check_flipbank_model(bank: Mapping[str, Any], model: Any, where: str = "FlipBank") -> None:
    """Refuse a FlipBank made by another model: its margins and flips say nothing about `model`.

    Raises:
        FlipscopeError: the bank records a model whose weight fingerprint differs from `model`'s.
    """
    recorded = bank.get("source", {}).get("model", {})
    current = model.identity()
    if recorded.get("fingerprint") not in (None, current["fingerprint"]):
        raise FlipscopeError(
            f"{where} was made by model {recorded.get('name')!r} (fingerprint {recorded.get('fingerprint')}), "
            f"not by {current['name']!r} (fingerprint {current['fingerprint']}); curate a FlipBank for this model "
            "with `flipscope evaluate` and `flipscope curate`"
        )
