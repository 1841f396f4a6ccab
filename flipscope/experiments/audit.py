"""Auditing a cure against the Dangerous-quadrant trap: a model that stops flipping because it stopped
reading the image is not cured.

The base model and each cured model (a folded checkpoint, an adapter, a run-time clamp: anything
`HookedVLM` loads or an edit makes) answer the same questions with the image and with it removed,
each into its own resumable store. Per question, paired against the base: the flip (over every
paraphrase, and over the paraphrases of the families the cure never trained on), the original's
correctness, whether it lands in the Dangerous quadrant (consistent, and the same answer without
the image) and whether it agrees with its text-only answer. Each change carries a bootstrap CI
over questions and McNemar's exact test, and a verdict is chosen by the intervals (`verdict`).

A gray blank is the paper's removal, but an answer that survives it may only agree with its text
prior: a consistent question whose flips a cure fixed moves from Worst to Dangerous without losing
anything it read from the film. So each question is also asked with a film of the same finding
whose truth is the opposite (`swap_match="opposite"`): an answer that survives *that* does not
read the film. `dangerous_opposite` (consistent, and the same answer on the opposite film) is the
trap measured cleanly, with its own verdict; the moves into Dangerous are counted by origin (from
Worst: already agreeing with the text; from Ideal or Fragile: the image lost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flipscope.data.questions import Question
from flipscope.data.store import iter_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.clamping import paired_difference
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.summary import question_table
from flipscope.model.hooked import HookedVLM
from flipscope.model.vision_once import distinct_images_of, share_image_memo

__all__ = ["AUDIT_MEASURES", "NON_INFERIORITY", "audit_cures", "audit_measures", "verdict"]

AUDIT_MEASURES = ("flip_rate", "flip_rate_withheld", "accuracy", "dangerous_share", "text_only_agreement",
                  "dangerous_opposite", "survives_opposite")  # fmt: skip
DANGER = {"blank": "dangerous_share", "opposite": "dangerous_opposite"}
# How much more Dangerous a cure may be, at the upper end of its interval, and still count as
# "without more Dangerous answers" (a share of questions).
NON_INFERIORITY = 0.02


def audit_measures(entry: Mapping[str, Any], withheld: Sequence[str]) -> dict[str, bool | None]:
    """A question's audited outcomes (module docstring); `flip_rate_withheld` is None when the
    question has no paraphrase of a withheld family."""
    held = [k for k, fam in entry["strategies"].items() if fam in withheld and k in entry["paraphrase_flips"]]
    swap, image = entry["answers"].get("swap", {}), entry["answers"]["image"]
    survives = bool(swap[0] == image[0]) if 0 in swap else None
    return {
        "flip_rate": entry["flip"],
        "flip_rate_withheld": any(entry["paraphrase_flips"][k] for k in held) if held else None,
        "accuracy": entry["correct"],
        "dangerous_share": entry["quadrant"] == "Dangerous",
        "text_only_agreement": entry["text_only_agreement"],
        "dangerous_opposite": None if survives is None else (not entry["flip"] and survives),
        "survives_opposite": survives,
    }


def verdict(paired: Mapping[str, Mapping[str, Any]], danger_measure: str = "dangerous_share") -> str:
    """The cure's verdict, chosen by the intervals of its paired changes: `cured` (fewer flips, and
    the Dangerous share's upper bound within `NON_INFERIORITY`), `trap` (fewer flips, more
    Dangerous answers), `unresolved` (fewer flips; an increase in Dangerous answers not ruled
    out), `more_flips` or `no_fewer_flips`. `danger_measure` is the Dangerous share judged: the
    paper's (blank) or `dangerous_opposite`."""
    flips, danger = paired["flip_rate"]["change"], paired[danger_measure]["change"]
    if flips["low"] > 0:
        return "more_flips"
    if flips["high"] >= 0:
        return "no_fewer_flips"
    if danger["low"] > 0:
        return "trap"
    return "cured" if danger["high"] <= NON_INFERIORITY else "unresolved"


def _table(model: HookedVLM, questions: Sequence[Question], cfg: EvalConfig, path: Path, progress: bool):
    """`model`'s evaluation, each film through the tower once (`distinct_images_of`): a cure that
    shares the base's image memo (an edited sibling such as a clamp, or one whose tower holds the
    base's weights: `share_image_memo`) does not encode the films the base saw again, and a film
    shown with its own question and as another's opposite is encoded once."""
    with distinct_images_of(model):
        run_sweep(model, questions, cfg, path, progress=progress)
    return question_table(iter_rows(path))


def audit_cures(
    base: HookedVLM,
    cured: Mapping[str, HookedVLM],
    questions: Sequence[Question],
    out: str | Path,
    *,
    withheld: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `base` and every cured model on `questions` with the image, the gray blank and
    the opposite-label film (stores `out/base/results.jsonl`, `out/<name>/results.jsonl`, each resumable) and compare
    each cure with the base, question by question (module docstring).

    Returns:
        `{"withheld", "n_questions", "base": {measure: rate}, "cures": [{"name", "identity",
        "rates", "paired": {measure: paired_difference}, "into_dangerous", "verdict",
        "verdict_opposite"}]}`; a measure no question has (no withheld family, no opposite film)
        is left out.

    Raises:
        FlipscopeError: no cure, or a cure named `base` or with a `/`.
    """
    if not cured:
        raise FlipscopeError("audit needs at least one cured model beside the base")
    for name in cured:
        if name == "base" or not name or "/" in name:
            raise FlipscopeError(f"cure name {name!r}: use a nonempty folder name other than 'base'")
    for model in cured.values():  # a cure loaded on its own whose tower is the base's: its memo too
        share_image_memo(base, model)
    cfg = EvalConfig(conditions=("image", "blank", "swap"), swap_match="opposite")
    out = Path(out)
    before = _table(base, questions, cfg, out / "base" / "results.jsonl", progress)
    ids = sorted(before)
    base_measures = {q: audit_measures(before[q], withheld) for q in ids}
    measures = [m for m in AUDIT_MEASURES if any(base_measures[q][m] is not None for q in ids)]
    report: dict[str, Any] = {"withheld": list(withheld), "n_questions": len(ids), "cures": []}
    report["base"] = {m: _rate([base_measures[q][m] for q in ids]) for m in measures}
    for name, model in cured.items():
        after = _table(model, questions, cfg, out / name / "results.jsonl", progress)
        cure_measures = {q: audit_measures(after[q], withheld) for q in ids}
        paired = {}
        for m in measures:
            keep = [q for q in ids if base_measures[q][m] is not None]
            paired[m] = paired_difference([base_measures[q][m] for q in keep], [cure_measures[q][m] for q in keep])
        report["cures"].append({
            "name": name,
            "identity": model.identity(),
            "rates": {m: _rate([cure_measures[q][m] for q in ids]) for m in measures},
            "paired": paired,
            "into_dangerous": _moves(before, after, ids),
            "verdict": verdict(paired),
            "verdict_opposite": verdict(paired, DANGER["opposite"]) if DANGER["opposite"] in paired else None,
        })  # fmt: skip
    return report


def _moves(before: Mapping[str, Any], after: Mapping[str, Any], ids: Sequence[str]) -> dict[str, int]:
    """Questions that entered (or left) the Dangerous quadrant, by where they came from."""
    moved = {"from_worst": 0, "from_image_reliant": 0, "left": 0}
    for q in ids:
        was, now = before[q]["quadrant"], after[q]["quadrant"]
        if now == "Dangerous" and was == "Worst":
            moved["from_worst"] += 1
        elif now == "Dangerous" and was in ("Ideal", "Fragile"):
            moved["from_image_reliant"] += 1
        elif was == "Dangerous" and now != "Dangerous":
            moved["left"] += 1
    return moved


def _rate(values: Sequence[bool | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept)
