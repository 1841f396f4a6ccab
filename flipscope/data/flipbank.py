"""FlipBank: the curated flip cases every later stage runs on, with matched non-flip controls.

A FlipBank is one JSON file (`"format": "flipbank/1"`) holding the curation rules that made it,
the model and evaluation it came from, and two lists of cases: `flips` (the paraphrase changes the
answer with the image) and `controls` (a paraphrase of a question in the same set that does not).
Each case: id, question_id, image (and/or context: the text passage a text-evidence model such as
`gemma3_text` was shown), finding, truth, original, paraphrase, prompt_index, strategy, answer/margin
of the original and of the paraphrase, and (flips only) direction `yes→no` or `no→yes`.

In Python a bank is a `FlipBank` and each case a `FlipCase`: the JSON objects themselves (dict
subclasses, so they serialise and compare as the file does) read through typed attributes
(`bank.flips`, `case.direction`, `case.margin_shift`). Banks are made by
`flipscope.data.curation.curate`; every reader validates the whole file and lists each bad case
(field, value, what was expected).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError, problems_error

__all__ = [
    "FLIPBANK_FORMAT",
    "FlipBank",
    "FlipCase",
    "check_flipbank_model",
    "check_questions_digest",
    "is_finite_number",
    "load_flipbank",
    "save_flipbank",
]

logger = logging.getLogger(__name__)
FLIPBANK_FORMAT = "flipbank/1"
_CASE_FIELDS = {
    "id": str,
    "question_id": str,
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


def _key(name: str, doc: str) -> property:
    return property(lambda self: self.get(name), doc=doc)


class FlipCase(dict):
    """One case of a FlipBank, as its file stores it, with typed attributes."""

    id = _key("id", "`question_id/p<prompt_index>`.")
    question_id = _key("question_id", "The question it comes from.")
    image = _key("image", "The film shown (resolved against the bank's folder when loaded), or None.")
    context = _key("context", "The text passage shown to a text-evidence model, or None.")
    finding = _key("finding", "What the question asks about.")
    truth = _key("truth", "The ground-truth answer, `yes` or `no`.")
    original = _key("original", "The original wording.")
    paraphrase = _key("paraphrase", "The paraphrase.")
    prompt_index = _key("prompt_index", "Index of the paraphrase among the question's prompts (0 = original).")
    strategy = _key("strategy", "The paraphrase's strategy tag, or None.")
    original_answer = _key("original_answer", "Answer to the original with the image.")
    paraphrase_answer = _key("paraphrase_answer", "Answer to the paraphrase with the image.")
    original_margin = _key("original_margin", "Yes-minus-no margin of the original.")
    paraphrase_margin = _key("paraphrase_margin", "Yes-minus-no margin of the paraphrase.")
    direction = _key("direction", "`yes→no` or `no→yes` for a flip; None for a control.")

    @property
    def is_flip(self) -> bool:
        return self["original_answer"] != self["paraphrase_answer"]

    @property
    def margin_shift(self) -> float:
        """m_para − m_orig: how far the paraphrase moved the answer."""
        return float(self["paraphrase_margin"]) - float(self["original_margin"])


class FlipBank(dict):
    """A FlipBank (format in the module docstring), with typed attributes; `FlipBank.of` wraps
    any mapping of that shape without copying its values."""

    format = _key("format", f"The file format, {FLIPBANK_FORMAT!r}.")
    rules = _key("rules", "The `CurationRules` that made it, as a dict.")
    source = _key("source", "The evaluation store's header: model identity, questions, config.")

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> FlipBank:
        bank = cls(data)
        for kind in ("flips", "controls"):
            bank[kind] = [c if isinstance(c, FlipCase) else FlipCase(c) for c in bank[kind]]
        return bank

    @property
    def flips(self) -> list[FlipCase]:
        return self["flips"]

    @property
    def controls(self) -> list[FlipCase]:
        return self["controls"]

    @property
    def n_flips(self) -> int:
        return len(self["flips"])

    @property
    def n_controls(self) -> int:
        return len(self["controls"])

    @property
    def cases(self) -> list[FlipCase]:
        """Flips first, then controls (the order every stage uses)."""
        return [*self["flips"], *self["controls"]]


def _relative_images(bank: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The bank with every image under `root` written relative to it (so the folder can move)."""
    root = root.resolve()

    def rel(case: Mapping[str, Any]) -> dict[str, Any]:
        if case.get("image") is None:
            return dict(case)
        image = Path(case["image"]).resolve()
        return {**case, "image": image.relative_to(root).as_posix() if image.is_relative_to(root) else str(image)}

    return {**bank, "flips": [rel(c) for c in bank["flips"]], "controls": [rel(c) for c in bank["controls"]]}


def save_flipbank(bank: Mapping[str, Any], path: str | Path) -> Path:
    """Write a FlipBank (validated first, so a bad bank is never written); images inside the
    bank's folder are written relative to it."""
    _validate(bank, str(path))
    path = Path(path)
    write_json(path, _relative_images(bank, path.parent), ensure_ascii=False)
    return path


def _evidence_problems(case: Mapping[str, Any], label: str) -> list[str]:
    """A case shows an image (a path) or a text passage, or both; each, if present, a non-empty string."""
    problems = []
    for field in ("image", "context"):
        value = case.get(field)
        if value is not None and not (isinstance(value, str) and value.strip()):
            problems.append(f"{label}: field '{field}': expected a non-empty string, got {value!r}")
    if case.get("image") is None and case.get("context") is None:
        problems.append(f"{label}: field 'image': expected an image path (or a 'context' passage), got None")
    return problems


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
                ok = is_finite_number(value) if kind_type is float else isinstance(value, kind_type)
                if not ok:
                    problems.append(f"{label}: field '{field}': expected {kind_type.__name__}, got {value!r}")
            problems += _evidence_problems(case, label)
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
        raise problems_error("the FlipBank", problems)


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a finite int or float (not a bool): what a case's margin must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def load_flipbank(path: str | Path, image_root: str | Path | None = None) -> FlipBank:
    """Read and validate a FlipBank; every bad case is listed. Relative image paths come back
    resolved against `image_root` (default: the bank's folder).

    Raises:
        FlipscopeError: the file is unreadable or a case is bad (field, value, why).
    """
    path = Path(path)
    try:
        bank = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise FlipscopeError(
            f"cannot read FlipBank {str(path)!r}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except (OSError, json.JSONDecodeError, RecursionError) as err:
        raise FlipscopeError(f"cannot read FlipBank {str(path)!r}: {err or 'nested too deeply'}") from err
    if not isinstance(bank, dict):
        raise FlipscopeError(
            f"FlipBank {str(path)!r} is a JSON {type(bank).__name__}; expected an object (format, flips, controls)"
        )
    root = Path(image_root) if image_root is not None else path.parent
    _validate(bank, str(path), root)
    _check_bank_questions(bank, f"FlipBank {str(path)!r}")
    for case in (*bank["flips"], *bank["controls"]):
        if case.get("image") is not None:
            image = Path(case["image"])
            case["image"] = str(image if image.is_absolute() else root / image)
    return FlipBank.of(bank)


def check_questions_digest(
    source: Any,
    questions_sha256: str | None,
    *,
    allow: bool = False,
    where: str = "the questions",
    hint: str = "evaluate them again, or pass --allow-edited-questions to curate anyway (recorded in the FlipBank)",
) -> dict[str, str] | None:
    """Refuse questions whose fingerprint differs from the one the evaluation `source` (a store
    header) recorded: their wording would be paired with margins of other wordings.

    Returns:
        None when they agree (or either digest is unknown); with `allow`, the override to record:
        `{"store": recorded, "questions": questions_sha256}`.

    Raises:
        FlipscopeError: the digests differ and `allow` is False; both digests are named.
    """
    questions = source.get("questions") if isinstance(source, Mapping) else None
    recorded = questions.get("sha256") if isinstance(questions, Mapping) else None
    if not isinstance(recorded, str) or questions_sha256 is None or recorded == questions_sha256:
        return None
    if not allow:
        raise FlipscopeError(
            f"{where} differ from those the evaluation ran on (questions sha256 {recorded} in the store, "
            f"{questions_sha256} now): edited wording would be paired with the old margins; {hint}"
        )
    logger.warning("curating with questions edited since the evaluation (%s -> %s)", recorded, questions_sha256)
    return {"store": recorded, "questions": questions_sha256}


def _check_bank_questions(bank: Mapping[str, Any], where: str) -> None:
    """A bank curated from questions other than the evaluation's, without the recorded override,
    is refused by every stage that reads it."""
    curated = bank.get("questions_sha256")
    if curated is not None and not isinstance(curated, str):
        raise FlipscopeError(f"{where}: field 'questions_sha256': expected a sha256 string, got {curated!r}")
    if bank.get("questions_edited"):
        logger.warning("%s was curated from questions edited since its evaluation: %s", where, bank["questions_edited"])
        return
    check_questions_digest(
        bank.get("source"),
        curated,
        where=f"{where}: the questions it was curated from",
        hint="curate it again from an evaluation of the questions as they are",
    )


def check_flipbank_model(bank: Mapping[str, Any], model: Any, where: str = "FlipBank") -> None:
    """Refuse a FlipBank made by another model: its margins and flips say nothing about `model`.

    Raises:
        FlipscopeError: the bank records a model whose weight fingerprint differs from `model`'s.
    """
    recorded = bank.get("source", {}).get("model", {})
    current = model.identity()
    if recorded.get("fingerprint") not in (None, current["fingerprint"]):

        def name(identity: Mapping[str, Any]) -> str:
            adapter = f" with adapter {identity['adapter']!r}" if identity.get("adapter") else ""
            return f"{identity.get('name')!r}{adapter} (fingerprint {identity.get('fingerprint')})"

        raise FlipscopeError(
            f"{where} was made by another model: {name(recorded)}, not {name(current)}; curate a FlipBank for "
            "this model with `flipscope evaluate` and `flipscope curate`"
        )
