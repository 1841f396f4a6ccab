"""Which features carry the wording that flips answers? The verdict discovery states.

A FlipBank curated with family-matched controls (`CurationRules(match="family")`) pairs every flip
with a non-flip of the same paraphrase family and finding: the same wording, the answer kept. Two
questions are asked of the pairs, each against a null that keeps the answer structure:

1. **Which features carry the wording?** `framing_specificity`: each feature's shift on the
   non-flips (framing), its extra shift on the flips (answer), and its decoder's alignment with
   the answer readout, with max-|t| nulls over the whole dictionary.
2. **Do the margin-tracking rankings single out the flips?** `pair_swap_nulls` for correlation,
   separation, size and attribution: a statistic that a readout feature reaches on any case of
   the same wording is not evidence about the flips.

A framing mechanism is claimed only when some feature's framing shift beats its null, replicates
on question-disjoint halves of the pairs, and is larger, the same way, on the flips than on their
controls (`Specificity.found`), and when most flips lie beyond the wording's reach (`reach`): answers
further from the boundary than the wording moves its controls, not near-boundary answers it tips
over. The answer-readout features are named either way. Fewer
than `MIN_PAIRS` pairs claim nothing; the pair-swap nulls are still computed from two pairs on (and
flagged where they are printed), so a small bank shows what its statistics are worth rather than
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from flipscope.data.flipbank import is_finite_number
from flipscope.errors import FlipscopeError
from flipscope.experiments.nulls import NullTest, pair_swap_nulls
from flipscope.experiments.reach import Reach, wording_reach
from flipscope.experiments.specificity import (
    MIN_PAIRS,
    Specificity,
    framing_share,
    framing_specificity,
)

__all__ = ["FramingAnalysis", "control_pairs", "framing_analysis"]


def control_pairs(cases: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (flip, its control) of every control that names a flip of the same bank
    (`control_for`); empty when the bank's controls are not family-matched."""
    row = {c["id"]: i for i, c in enumerate(cases) if "direction" in c}
    pairs = np.array(
        [(row[c["control_for"]], i) for i, c in enumerate(cases) if c.get("control_for") in row], dtype=np.int64
    ).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True)
class FramingAnalysis:
    """The three tests of the module docstring and the verdict they support.

    Attributes:
        n_pairs: Flip–control pairs (0 when the controls are not family-matched).
        specificity: Per-feature framing and answer tests (None with fewer than `MIN_PAIRS` pairs).
        nulls: Ranking statistic → its pair-swap null.
        found: Whether a framing mechanism is claimed.
        verdict: The sentence discovery prints.
        reach: The wording's reach and the share of flips beyond it (None with fewer than
            `MIN_PAIRS` pairs).
    """

    n_pairs: int
    specificity: Specificity | None
    nulls: dict[str, NullTest]
    found: bool
    verdict: str
    reach: Reach | None = None

    def to_dict(self) -> dict[str, Any]:
        spec = self.specificity
        return {
            "n_pairs": self.n_pairs,
            "found": self.found,
            "verdict": self.verdict,
            "thresholds": None
            if spec is None
            else {
                "framing_t": spec.framing_threshold,
                "answer_t": spec.answer_threshold,
                "answer_cos": spec.answer_cos_threshold,
            },
            "replication": None
            if spec is None
            else {
                "halves": list(spec.halves),
                "beating_null": [int(f) for f in np.flatnonzero(spec.beats_null)],
                "replicated": [int(f) for f in np.flatnonzero(spec.beats_null & spec.replicated)],
            },
            "stronger_where_flipped": None
            if spec is None
            else [int(f) for f in np.flatnonzero(spec.stronger_where_flipped)],
            "reach": None if self.reach is None else self.reach.to_dict(),
            "nulls": {
                name: {
                    "null_top": test.threshold,
                    "observed_top": float(test.observed.max()),
                    "n_beating": int(test.beats.sum()),
                }
                for name, test in self.nulls.items()
            },  # fmt: skip
        }


def _features(ids: np.ndarray, limit: int = 5) -> str:
    """`Feature 3` or `Features 3, 15 and 2 more`."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"Feature{'s' if len(ids) > 1 else ''} {shown}{more}"


def _refused(n_pairs: int) -> str:
    why = (
        "its controls are not family-matched (curate with --match family)"
        if n_pairs == 0
        else f"only {n_pairs} flips have a family-matched control (at least {MIN_PAIRS} are needed)"
    )
    return f"No framing mechanism can be claimed from this FlipBank: {why}."


def _verdict(spec: Specificity, reach: Reach, hook: str) -> tuple[bool, str]:
    n_pairs = spec.n_pairs
    readout = np.flatnonzero(spec.labels == "answer readout")
    moves = "moves" if len(readout) == 1 else "move"
    tail = f" {_features(readout)} {moves} with the answer only (answer readout)." if len(readout) else ""
    framing = spec.framing_features
    unreplicated = np.flatnonzero(spec.beats_null & ~spec.replicated)
    if not len(framing) and len(unreplicated):
        a, b = spec.halves
        return False, (
            f"No framing mechanism was found at {hook}: {_features(unreplicated).lower()} "
            f"{'shifts' if len(unreplicated) == 1 else 'shift'} on the {n_pairs} same-family non-flips beyond the "
            f"null (|t| > {spec.framing_threshold:.1f}) but not again on question-disjoint halves of {a} and {b} "
            f"pairs, as a wording that carries the flips would.{tail}"
        )
    if not len(framing):
        top = float(np.abs(spec.framing_t).max())
        return False, (
            f"No framing mechanism was found at {hook}: no feature shifts on the {n_pairs} same-family non-flips "
            f"beyond the null (largest |t| {top:.1f}, null {spec.framing_threshold:.1f}).{tail}"
        )
    mixed = [int(f) for f in framing if spec.labels[f] == "framing + readout"]
    writes = "also writes" if len(mixed) == 1 else "also write"
    also = f" ({_features(np.array(mixed)).lower()} {writes} the answer)" if mixed else ""
    carry, they = ("carries", "it shifts") if len(framing) == 1 else ("carry", "they shift")
    shift = (
        f"{also}: {they} on the {n_pairs} same-family non-flips, where the answer held, beyond the null "
        f"(|t| > {spec.framing_threshold:.1f}), and again on question-disjoint halves"
    )
    carried = f"{_features(framing)} {carry} the wording at {hook}{shift}"
    stronger = [int(f) for f in framing if spec.stronger_where_flipped[f]]
    if not stronger:
        return False, (
            f"No framing mechanism was found at {hook}: {_features(framing).lower()} {carry} the wording{shift}, "
            "but no more where the "
            f"answer flipped than on the flips' own controls (answer |t| ≤ {spec.answer_threshold:.1f}): the wording "
            f"is read there, and the flips are not where it is read more strongly.{tail}"
        )
    further = "shifts" if len(stronger) == 1 else "shift"
    stronger_clause = (
        f"{_features(np.array(stronger)).lower()} {further} further the same way where the answer "
        f"flipped (|t| > {spec.answer_threshold:.1f})"
    )
    if not reach.informative:
        return False, (
            f"No framing mechanism can be claimed at {hook}: {_features(framing).lower()} {carry} the wording{shift}, "
            f"and {stronger_clause}, but the bank kept only flips at least {reach.floor:.2f} from a margin of 0, "
            f"beyond the wording's reach on their controls ({reach.reach:.2f} logits), so it cannot tell "
            f"near-boundary flips from overturned answers (curate with a lower --min-margin).{tail}"
        )
    if not reach.beyond:
        return False, (
            f"No framing mechanism was found at {hook}: {_features(framing).lower()} {carry} the wording{shift}, "
            f"and {stronger_clause}, but the flips are near-boundary answers: only {reach.sentence()}, where a "
            "mechanism needs most of them. Flips are chosen by their answer change, so a feature that moves with "
            f"the margin reads more strongly on answers this close to 0 without overturning any.{tail}"
        )
    return True, f"{carried}; {stronger_clause}; {reach.sentence()}.{tail}"


def framing_analysis(
    delta_f: Float[np.ndarray, "case k"],
    margin_shift: Float[np.ndarray, " case"],
    cases: Sequence[dict[str, Any]],
    hook: str,
    *,
    margin_orig: Float[np.ndarray, " case"] | None = None,
    min_margin: float = 0.0,
    attribution: Float[np.ndarray, "case k"] | None = None,
    answer_cos: Float[np.ndarray, " k"] | None = None,
    answer_cos_threshold: float | None = None,
    decoder: Float[np.ndarray, "k d_model"] | None = None,
    resid_delta: Float[np.ndarray, "case d_model"] | None = None,
    n_perm: int = 500,
    seed: int = 0,
) -> FramingAnalysis:
    """The tests and verdict of the module docstring for one bank's cases (rows of `delta_f`,
    `margin_shift`, `attribution` and `resid_delta` follow `cases`). With the SAE's `decoder` and
    the residual Δ at its hook, framing features are ranked by their share of the controls' mean
    Δresidual (`framing_share`). `margin_orig` (the originals' margins, as `margin_shift` was
    measured) defaults to the cases' `original_margin`; `min_margin` is the bank's curation floor
    (`rules.min_margin`).

    Raises:
        FlipscopeError: without `margin_orig`, a paired case has no numeric `original_margin`.
    """
    flips, controls = control_pairs(cases)
    questions = np.array([str(cases[i].get("question_id", cases[i]["id"])) for i in flips])

    def swap_nulls() -> dict[str, NullTest]:
        return pair_swap_nulls(
            delta_f[flips], delta_f[controls], margin_shift[flips], margin_shift[controls],
            attribution_flip=None if attribution is None else attribution[flips],
            attribution_control=None if attribution is None else attribution[controls], n_perm=n_perm, seed=seed,
        )  # fmt: skip

    if len(flips) < MIN_PAIRS:
        return FramingAnalysis(len(flips), None, swap_nulls() if len(flips) >= 2 else {}, False, _refused(len(flips)))
    if margin_orig is None:
        margin_orig = _original_margins(cases, np.concatenate([flips, controls]))
    reach = wording_reach(margin_orig, margin_shift, flips, controls, questions, floor=min_margin, seed=seed)
    share = None
    if decoder is not None and resid_delta is not None:
        share = framing_share(decoder, delta_f[controls].mean(0), resid_delta[controls].mean(0))
    spec = framing_specificity(
        delta_f[flips], delta_f[controls], answer_cos=answer_cos, answer_cos_threshold=answer_cos_threshold,
        share=share, groups=questions, n_perm=n_perm, seed=seed,
    )  # fmt: skip
    found, verdict = _verdict(spec, reach, hook)
    return FramingAnalysis(len(flips), spec, swap_nulls(), found, verdict, reach)


def _original_margins(cases: Sequence[dict[str, Any]], rows: np.ndarray) -> Float[np.ndarray, " case"]:
    """Each case's `original_margin` (NaN where no row asks for it), refusing a paired case without one."""
    out = np.full(len(cases), np.nan)
    for i in rows:
        value = cases[i].get("original_margin")
        if not is_finite_number(value):
            raise FlipscopeError(
                f"case {cases[i].get('id', i)!r}: original_margin must be a finite number (the reach test reads "
                f"it), got {value!r}"
            )
        out[i] = float(value)
    return out
