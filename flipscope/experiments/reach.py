"""Did the wording overturn answers, or tip answers that sat on the boundary? The reach a framing
claim must show.

Every model reads its words, so any rewording moves the margin a little. On a model whose flips
are noise, the flips are the answers that sat near a margin of 0, and a wording feature that
moves with the margin shifts further on them than on their controls: flips are selected by the
answer change, so the feature-level tests (`specificity`) find "more where flipped" without any
mechanism (the null organism does this once its bank holds a hundred pairs).

The wording's **reach** is how far it moves the answers it did not flip: the 95th percentile of
|Δmargin| over the family-matched controls (same wording, answer held). A flip is **beyond reach**
when its original |margin| exceeds that: the wording's ordinary effect cannot explain it. A framing
mechanism is claimed only when most flips are beyond reach, the share's bootstrap interval (over
questions, the reach re-estimated in every resample) lying above `REACH_BAR`. Where it does not,
the flips are near-boundary answers the wording tips over: a real sensitivity, named as such, but
not a shortcut that overturns answers. Measured: the shipped organism's bank 0.83 [0.67, 1.00];
null organisms' loosely curated banks (three seeds, 80 and 320 films) 0.07 to 0.26, no interval's
lower end above 0.04.

The share is necessary, not sufficient: a curation that keeps only flips with both margins away
from 0 (the bank's `min_margin`, the `floor` here) removes the near-boundary flips, and where the
wording barely moves the controls every flip left is "beyond" (a null seed's 12-pair bank: 1.0).
Where the reach does not exceed the floor, every kept flip is beyond it by construction and the
share says nothing: the claim is then refused (`informative`). The claim also needs the
feature-level tests, which held nothing on those banks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from flipscope.stats import Estimate

__all__ = ["REACH_BAR", "REACH_QUANTILE", "Reach", "wording_reach"]

REACH_QUANTILE = 0.95
REACH_BAR = 0.5  # "most flips": the interval's lower end must exceed it


@dataclass(frozen=True)
class Reach:
    """The wording's reach on a bank's flip–control pairs and the share of flips beyond it.

    Attributes:
        reach: 95th percentile of |Δmargin| over the controls, in logits.
        share: Share of flips whose original |margin| exceeds `reach`, with its interval.
        flip_margin: Median original |margin| of the flips; `control_margin` of the controls.
        floor: The curation's margin floor (`min_margin`): no kept flip started nearer 0.
    """

    reach: float
    share: Estimate
    flip_margin: float
    control_margin: float
    floor: float = 0.0

    @property
    def informative(self) -> bool:
        """Whether the reach exceeds the curation's floor (else every kept flip is beyond it)."""
        return self.reach > self.floor

    @property
    def beyond(self) -> bool:
        """Whether most flips lie beyond the wording's reach (interval above `REACH_BAR`), on a
        bank whose curation left that open (`informative`)."""
        return self.informative and self.share.low > REACH_BAR

    def sentence(self) -> str:
        """`0.832 [0.674, 1.000] of the 131 flips with a same-family control ... (5.24 logits)`: in words."""
        return (
            f"{self.share} of the {self.share.n} flips with a same-family control were answers further from a "
            f"margin of 0 than the wording moves 95% of their controls ({self.reach:.2f} logits)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reach": self.reach,
            "share_beyond": self.share.to_dict(),
            "bar": REACH_BAR,
            "beyond": self.beyond,
            "floor": self.floor,
            "informative": self.informative,
            "median_abs_margin_flips": self.flip_margin,
            "median_abs_margin_controls": self.control_margin,
        }


def _share(flip_margin: np.ndarray, control_shift: np.ndarray) -> float:
    reach = np.quantile(control_shift, REACH_QUANTILE)
    return float((flip_margin > reach).mean())


def wording_reach(
    margin_orig: Float[np.ndarray, " case"],
    margin_shift: Float[np.ndarray, " case"],
    flips: Int[np.ndarray, " pair"],
    controls: Int[np.ndarray, " pair"],
    groups: Sequence[str] | np.ndarray,
    *,
    floor: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> Reach:
    """The reach of the module docstring for pairs (`flips[i]`, `controls[i]`) of case rows, the
    interval from resampling whole questions (`groups`, one per pair) with their pairs; `floor`
    is the curation's `min_margin`."""
    flip_margin = np.abs(np.asarray(margin_orig, dtype=np.float64)[flips])
    control_shift = np.abs(np.asarray(margin_shift, dtype=np.float64)[controls])
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        boots[b] = _share(flip_margin[rows], control_shift[rows])
    low, high = np.quantile(boots, [0.025, 0.975])
    share = Estimate(_share(flip_margin, control_shift), float(low), float(high), len(flips))
    return Reach(
        reach=float(np.quantile(control_shift, REACH_QUANTILE)),
        share=share,
        flip_margin=float(np.median(flip_margin)),
        control_margin=float(np.median(np.abs(np.asarray(margin_orig, dtype=np.float64)[controls]))),
        floor=float(floor),
    )
