"""The guard at run time over a questions file: every wording of every question answered through
`GuardedVLM` with its flags, into a resumable store, and what the flags caught.

Each wording (the original and each paraphrase, shown with the question's film) is one request,
as a clinician would send it. Where the questions carry their truth (a questions file always
does), the summary measures the guard on them, per question as `guard calibrate` does:

- the share of answers it abstains on, and the accuracy of those it keeps against those it holds;
- on each question's original wording, the share of **flip-prone** questions (some paraphrase's
  answer differs from the original's, read in the original's frame) it flagged, beside the share
  of stable ones it flagged too;
- the answers whose image check found no reference film (flag unknown).

Intervals are bootstrap intervals over questions (a question's wordings are not independent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from flipscope.data.questions import Question
from flipscope.data.store import ResultStore, iter_rows
from flipscope.errors import FlipscopeError
from flipscope.interventions.guarded import GuardedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.model.vision_once import distinct_images_of

__all__ = ["QUESTIONS_PER_UNIT", "guard_run", "guard_run_summary", "guarded_rows"]

QUESTIONS_PER_UNIT = 8


def guarded_rows(
    guard: GuardedVLM, chunk: Sequence[Question], batch_size: int, fast: bool = True
) -> list[dict[str, Any]]:
    """Every wording of `chunk`'s questions answered through `guard` (on the suffix path with
    `fast`): one store row each (module docstring)."""
    specs, findings, where = [], [], []
    for q in chunk:
        for k, text in enumerate((q.question, *q.paraphrases)):
            if q.image is not None:
                specs.append(PromptSpec(question=text, image=q.image))
            else:  # a text model's question: its passage, if it has one
                specs.append(PromptSpec(question=text, condition="context" if q.context else "none", context=q.context))
            findings.append(q.finding)
            where.append((q, k, text))
    answers = guard.answer(specs, findings, batch_size=batch_size, fast=fast)
    return [
        {
            "question_id": q.id, "prompt_index": k, "prompt": text, "finding": q.finding,
            "truth": "yes" if q.answer != q.inverted(k) else "no",
            "relation": "inverted" if q.inverted(k) else "same",
            "answer": a.answer, "margin": a.margin, "flip_prone": a.flip_prone,
            "image_unreliant": a.image_unreliant, "abstain": a.abstain, "reasons": list(a.reasons),
        }
        for (q, k, text), a in zip(where, answers, strict=True)
    ]  # fmt: skip


def guard_run(
    guard: GuardedVLM,
    questions: Sequence[Question],
    path: str | Path,
    header: Mapping[str, Any],
    *,
    batch_size: int = 32,
    fast: bool = True,
    progress: bool = True,
) -> Path:
    """Answer every wording of `questions` through `guard` into the store at `path` (one unit per
    `QUESTIONS_PER_UNIT` questions; a rerun with the same `header` resumes), each batch's part
    before the questions run once per film with `fast` (`GuardedVLM.answer`). Returns the path."""
    from tqdm.auto import tqdm

    if not questions:
        raise FlipscopeError("no questions to answer")
    chunks = [questions[i : i + QUESTIONS_PER_UNIT] for i in range(0, len(questions), QUESTIONS_PER_UNIT)]
    # a film serves its question's every wording and the reference films serve many: the tower once each
    with distinct_images_of(guard), ResultStore.open(path, {"kind": "guarded-answers", **header}) as store:
        for n, chunk in enumerate(tqdm(chunks, desc="guarded answers", disable=not progress)):
            unit = f"questions-{n:05d}"
            if unit not in store.done:
                store.append(unit, guarded_rows(guard, chunk, batch_size, fast))
    return Path(path)


def _per_question(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["question_id"], []).append(r)
    out: dict[str, list] = {k: [] for k in ("answers", "abstained", "kept_right", "held_right", "flip_prone",
                                            "flagged", "unknown")}  # fmt: skip
    for wordings in by.values():
        wordings = sorted(wordings, key=lambda r: r["prompt_index"])
        right = np.array([r["answer"] == r["truth"] for r in wordings])
        held = np.array([bool(r["abstain"]) for r in wordings])
        framed = [(r["answer"] == "yes") != (r["relation"] == "inverted") for r in wordings]  # the original's frame
        out["answers"].append(len(wordings))
        out["abstained"].append(held.sum())
        out["kept_right"].append(right[~held].sum())
        out["held_right"].append(right[held].sum())
        out["flip_prone"].append(any(f != framed[0] for f in framed[1:]))
        out["flagged"].append(bool(wordings[0]["flip_prone"]))
        out["unknown"].append(sum(r["image_unreliant"] is None for r in wordings))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _ratio(
    num: Float[np.ndarray, " question"], den: Float[np.ndarray, " question"], seed: int, n_boot: int = 2000
) -> dict[str, Any] | None:
    """sum(num) / sum(den) with a percentile-bootstrap interval over questions (resampled whole);
    None where den sums to 0. `n`: the questions den counts."""
    if den.sum() == 0:
        return None
    n = len(num)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)
    tops, bottoms = counts @ num, counts @ den
    boots = tops[bottoms > 0] / bottoms[bottoms > 0]  # a resample with no such answer has no ratio
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"value": float(num.sum() / den.sum()), "low": float(low), "high": float(high), "n": int((den > 0).sum())}


def guard_run_summary(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """What the guard did on a `guard_run` store (module docstring)."""
    q = _per_question(list(iter_rows(path)))
    kept = q["answers"] - q["abstained"]
    flip = q["flip_prone"].astype(bool)
    ones = np.ones_like(flip, dtype=np.float64)
    return {
        "n_questions": len(flip),
        "n_answers": int(q["answers"].sum()),
        "abstained": _ratio(q["abstained"], q["answers"], seed),
        "accuracy_kept": _ratio(q["kept_right"], kept, seed),
        "accuracy_held": _ratio(q["held_right"], q["abstained"], seed),
        "flip_prone_questions": _ratio(flip.astype(float), ones, seed),
        "flagged_flip_prone": _ratio(q["flagged"] * flip, flip.astype(float), seed),
        "flagged_stable": _ratio(q["flagged"] * ~flip, (~flip).astype(float), seed),
        "image_check_unknown": int(q["unknown"].sum()),
    }
