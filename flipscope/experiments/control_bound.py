"""How far a patch moves the same-family non-flips, against how far their own wording moves them.

A patch that removes the framing acts on every prompt of the family, flipped or not, so it moves
the non-flips' margins too. The bound is the framing's own effect on them: a patch may move a
non-flip as far as corrupting that non-flip's framing words does
(`flipscope.experiments.upstream.framing_word_shifts`), no further. Per non-flip the two
|margin change|s are paired, and the mean paired difference (patch − wording) with its bootstrap
CI gives the verdict:

- `within`: the patch moves them less than their wording does, on average (difference ≤ 0);
- `as much`: more on average, by a difference whose CI reaches 0 (no more that the data can tell);
- `beyond`: the CI lies above 0; the patch does more than take the framing out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flipscope.errors import FlipscopeError
from flipscope.experiments.upstream import framing_word_shifts
from flipscope.model.protocol import VLM
from flipscope.stats import bootstrap

__all__ = ["non_flip_wording", "wording_bound"]


def non_flip_wording(vlm: VLM, bank: Mapping[str, Any], batch_size: int = 16) -> dict[str, float] | None:
    """Each non-flip's |margin change| when its own framing words are corrupted, by case id
    (`framing_word_shifts`): what `wording_bound` pairs a patch's changes with; None for a bank
    without non-flips."""
    return framing_word_shifts(vlm, bank, batch_size=batch_size) if bank["controls"] else None


def wording_bound(
    changes: Mapping[str, float], wording: Mapping[str, float], *, seed: int = 0
) -> dict[str, Any] | None:
    """The non-flips' |margin change| under a patch (`changes`: signed, by case id) against
    their framing words' (`wording`: |Δm|, by case id), paired over the cases both have; None
    when none has a framing word of its own.

    Raises:
        FlipscopeError: a change is not a finite number.
    """
    ids = [case for case in changes if case in wording]
    if not ids:
        return None
    patched = np.abs(np.array([changes[case] for case in ids], dtype=np.float64))
    own = np.array([wording[case] for case in ids], dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(patched) & np.isfinite(own)))
    if len(bad):
        raise FlipscopeError(f"case {ids[bad[0]]!r}: a non-finite margin change is no answer to bound")
    difference = bootstrap(patched - own, seed=seed)
    verdict = "within" if difference.value <= 0 else "beyond" if difference.low > 0 else "as much"
    return {
        "n": len(ids),
        "n_without_words": len(changes) - len(ids),
        "patch": bootstrap(patched, seed=seed).to_dict(),
        "wording": bootstrap(own, seed=seed).to_dict(),
        "difference": difference.to_dict(),
        "verdict": verdict,
    }
