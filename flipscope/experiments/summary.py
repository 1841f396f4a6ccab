"""Flip and quadrant evaluation over a table of answers.

Definitions (PSF-Med): a question **flips** when the answer to any paraphrase differs from the
answer to the original; it is **consistent** when it does not flip. An answer-inverting paraphrase
(row `relation` = `inverted`) is read in the original's frame: its answer flips when it *equals*
the original's, and it is correct when it is the opposite of the original's truth. It is **image-reliant** when
its answer to the original changes when the image is removed. The four quadrants:

| | image-reliant | not image-reliant |
| --- | --- | --- |
| consistent | Ideal | Dangerous |
| inconsistent | Fragile | Worst |

Dangerous items are the trap: consistent and often accurate, but answered from the text alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from flipscope.errors import FlipscopeError
from flipscope.stats import bootstrap

__all__ = [
    "QUADRANTS",
    "by_family",
    "flip_rate_cells",
    "flips",
    "pairwise_disagreement",
    "quadrant_blocks",
    "quadrants",
    "question_block",
    "question_table",
    "summarize",
]

QUADRANTS: tuple[str, ...] = ("Ideal", "Fragile", "Dangerous", "Worst")


def flips(answers: Bool[np.ndarray, "n_items n_prompts"], original: int = 0) -> Bool[np.ndarray, " n_items"]:
    """Whether any prompt's answer differs from the original prompt's (column `original`)."""
    return (answers != answers[:, original : original + 1]).any(axis=1)


def pairwise_disagreement(answers: Bool[np.ndarray, "n_items n_prompts"]) -> Float[np.ndarray, " n_items"]:
    """Share of unordered prompt pairs whose answers differ, per item."""
    k = answers.shape[1]
    yes = answers.sum(axis=1)
    return (yes * (k - yes)) / (k * (k - 1) / 2)


def quadrants(consistent: Bool[np.ndarray, " n_items"], reliant: Bool[np.ndarray, " n_items"]) -> np.ndarray:
    """Quadrant name per item (see the module docstring)."""
    names = np.empty(consistent.shape, dtype=object)
    names[consistent & reliant] = "Ideal"
    names[~consistent & reliant] = "Fragile"
    names[consistent & ~reliant] = "Dangerous"
    names[~consistent & ~reliant] = "Worst"
    return names


def _collect(rows: Iterable[Mapping[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    """Per question, its answers by condition and prompt, read in one pass over `rows` (so a
    store can be streamed: only the per-question answers stay in memory)."""
    by_question: dict[str, dict[str, Any]] = {}
    excluded: set[str] = set()
    for row in rows:
        if source == "generated":
            if "parsed" not in row:
                raise FlipscopeError("answer source 'generated' needs rows from a run with generate_tokens > 0")
            if row["parsed"] is None:
                if row["prompt_index"] == 0:
                    excluded.add(row["question_id"])
                continue
            row = {**row, "answer": row["parsed"]}
        if row.get("relation") == "inverted":  # into the original's frame
            row = {**row, "answer": _opposite(row["answer"]), "truth": _opposite(row["truth"])}
        entry = by_question.setdefault(
            row["question_id"],
            {
                "finding": row["finding"],
                "truth": row["truth"] == "yes",
                "answers": {},
                "entropy": None,
                "margin": None,
                "strategies": {},
            },
        )
        condition = "image" if row["condition"] == "context" else row["condition"]  # the evidence shown
        entry["answers"].setdefault(condition, {})[row["prompt_index"]] = row["answer"] == "yes"
        if condition == "image" and row["prompt_index"] == 0:
            entry["entropy"], entry["margin"] = row["entropy"], row.get("margin")
        if row["prompt_index"] > 0:
            entry["strategies"][row["prompt_index"]] = row["strategy"]
    for question_id in excluded:  # the original's answer was excluded: the question drops out
        by_question.pop(question_id, None)
    return by_question


def _opposite(answer: str) -> str:
    return {"yes": "no", "no": "yes"}[answer]


def _measures(entry: dict[str, Any], removed: str | None) -> None:
    """Add the per-question measures to an entry of `_collect`."""
    answers = entry["answers"]
    indices = sorted(answers["image"])  # 0 (the original) first; dropped prompts are absent
    image = np.array([answers["image"][k] for k in indices])
    if removed is not None and removed not in answers:
        raise FlipscopeError(f"reliance condition {removed!r} was not evaluated (have {sorted(answers)})")
    removal = removed or ("blank" if "blank" in answers else "none" if "none" in answers else None)
    entry["flip"] = bool(flips(image[None, :])[0])
    entry["pairwise"] = float(pairwise_disagreement(image[None, :])[0])
    entry["correct"] = bool(image[0] == entry["truth"])
    entry["yes"] = bool(image[0])
    entry["reliant"] = bool(answers[removal][0] != image[0]) if removal else None
    entry["text_only_agreement"] = None if removal is None else not entry["reliant"]
    entry["swap_change"] = bool(answers["swap"][0] != image[0]) if "swap" in answers else None
    if entry["reliant"] is not None:
        entry["quadrant"] = str(quadrants(np.array([not entry["flip"]]), np.array([entry["reliant"]]))[0])
    else:
        entry["quadrant"] = None
    entry["paraphrase_flips"] = {k: bool(answers["image"][k] != image[0]) for k in indices[1:]}
    entry["paraphrase_text_only"] = (
        {k: bool(answers[removal][k] == answers["image"][k]) for k in indices[1:] if k in answers[removal]}
        if removal
        else {}
    )


def question_table(
    rows: Iterable[Mapping[str, Any]], removed: str | None = None, source: str = "margin"
) -> dict[str, dict[str, Any]]:
    """Per question, from store rows (a list, or `iter_rows(path)` to stream a store): answers by
    condition and prompt, and the per-question measures (flip, pairwise disagreement, correct,
    reliant, text-only agreement, swap change, quadrant, entropy and margin of the original answer
    with the image).

    Image reliance follows the paper: the answer to the original changes when the image is
    removed. `removed` names the condition that stands for "removed": `blank` (the paper's
    uniform image; the default when present), `none` (no image tokens), or `swap` (another
    patient's film); with None, `blank` if evaluated, else `none`.

    `source` is where answers come from: `margin` (its sign) or `generated` (the keyword-parsed
    generated text). With `generated`, prompts whose text is excluded by the parser drop out, and
    a question whose original is excluded (under any condition) drops out entirely.
    """
    if source not in ("margin", "generated"):
        raise FlipscopeError(f"answer source {source!r} is not 'margin' or 'generated'")
    by_question = _collect(rows, source)
    for entry in by_question.values():
        _measures(entry, removed)
    return by_question


def by_family(entries: Iterable[Mapping[str, Any]], key: str) -> dict[str, list[bool]]:
    """Per paraphrase family (strategy tag, or `untagged`), in order of first appearance, the values
    of each entry's per-paraphrase `key` (`paraphrase_flips` or `paraphrase_text_only`)."""
    groups: dict[str, list[bool]] = {}
    for e in entries:
        for k, value in e[key].items():
            groups.setdefault(e["strategies"].get(k) or "untagged", []).append(value)
    return groups


def summarize(
    rows: Iterable[Mapping[str, Any]], *, removed: str | None = None, source: str = "margin", seed: int = 0
) -> dict[str, Any]:
    """Flip rate, pairwise disagreement, accuracy, text-only agreement and swap sensitivity, overall
    and by finding, paraphrase strategy and quadrant, each with a bootstrap 95% CI over questions
    (by strategy: over paraphrases; there text-only agreement is the share of paraphrases answered
    the same with the image removed). `removed` and `source`: see `question_table`."""
    table = question_table(rows, removed, source)
    entries = list(table.values())
    strategies = by_family(entries, "paraphrase_flips")
    text_only = by_family(entries, "paraphrase_text_only")
    findings = sorted({e["finding"] for e in entries})
    return {
        "overall": question_block(entries, seed),
        "by_finding": {f: question_block([e for e in entries if e["finding"] == f], seed) for f in findings},
        "by_strategy": {
            s: {
                "paraphrase_flip_rate": _estimate(v, seed),
                "text_only_agreement": _estimate(text_only.get(s, []), seed),
                "n_paraphrases": len(v),
            }
            for s, v in strategies.items()
        },
        "by_quadrant": quadrant_blocks(entries, seed),
    }


def _estimate(values: list, seed: int) -> dict[str, Any]:
    """Bootstrap estimate of the mean over the values that are not None."""
    return bootstrap(np.array([v for v in values if v is not None], dtype=np.float64), seed=seed).to_dict()


def question_block(entries: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Flip rate, pairwise disagreement, accuracy, text-only agreement and swap sensitivity of
    `question_table` entries, each with a bootstrap 95% CI over questions."""
    return {
        "n_questions": len(entries),
        "flip_rate": _estimate([e["flip"] for e in entries], seed),
        "pairwise_disagreement": _estimate([e["pairwise"] for e in entries], seed),
        "accuracy": _estimate([e["correct"] for e in entries], seed),
        "text_only_agreement": _estimate([e["text_only_agreement"] for e in entries], seed),
        "swap_sensitivity": _estimate([e["swap_change"] for e in entries], seed),
    }


def quadrant_blocks(entries: list[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per quadrant: its share of the questions that have one, its accuracy and mean entropy (CIs)."""
    blocks = {}
    for name in QUADRANTS:
        members = [e for e in entries if e["quadrant"] == name]
        blocks[name] = {
            "share": _estimate([e["quadrant"] == name for e in entries if e["quadrant"] is not None], seed),
            "accuracy": _estimate([e["correct"] for e in members], seed),
            "mean_entropy_bits": _estimate([e["entropy"] for e in members], seed),
            "n_questions": len(members),
        }
    return blocks


def flip_rate_cells(
    rows: Iterable[Mapping[str, Any]], *, removed: str | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Per finding × paraphrase strategy, the share of paraphrases whose answer (with the image)
    differs from the original's, with a bootstrap 95% CI over paraphrases.

    Returns:
        One cell per (finding, family): `{finding, family, n, value, low, high}`.
    """
    groups: dict[tuple[str, str], list[bool]] = {}
    for entry in question_table(rows, removed).values():
        for k, flipped in entry["paraphrase_flips"].items():
            family = entry["strategies"].get(k) or "untagged"
            groups.setdefault((entry["finding"], family), []).append(flipped)
    return [
        {"finding": finding, "family": family, **bootstrap(np.array(v, dtype=np.float64), seed=seed).to_dict()}
        for (finding, family), v in sorted(groups.items())
    ]
