"""Permutation nulls for discovery's rankings that keep the answer structure.

Every flip moves the answer readout, so a statistic computed over flips (Δf against the margin
shift, mean |Δf|, attribution) finds readout features in any model that flips, and its parametric
p-value, which assumes the features are noise, calls them discoveries. The null here asks the
question that matters instead: *does the statistic single out the flips among cases of the same
wording?* Each flip is paired with its family-matched non-flip control (`control_for`); one
permutation swaps flip and control at random within each pair and recomputes the statistic on
the pseudo-flips (and, for separation, against the pseudo-controls). The null distribution is
that of the **largest** value over all features, so its 95th percentile is one threshold for the
whole dictionary and a feature's family-wise p is the share of permutations whose largest value
reaches its own (Westfall–Young single step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float

from flipscope.errors import FlipscopeError

__all__ = ["NULL_STATISTICS", "NullTest", "pair_swap_nulls", "statistic"]

NULL_STATISTICS = ("pearson", "spearman", "auc", "size", "attribution")


def _average_ranks(x: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
    """1-based column ranks, ties averaged (as `stats.correlations(rank=True)` ranks: sparse SAE
    codes tie at 0 on most cases)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=0)


def _abs_r(x: Float[np.ndarray, "n k"], y: Float[np.ndarray, " n"]) -> Float[np.ndarray, " k"]:
    xc, yc = x - x.mean(0), y - y.mean()
    denom = np.sqrt((xc**2).sum(0) * (yc**2).sum())
    return np.abs(np.divide((xc * yc[:, None]).sum(0), denom, out=np.zeros(x.shape[1]), where=denom > 0))


def _abs_auc(a: Float[np.ndarray, "n k"], b: Float[np.ndarray, "m k"]) -> Float[np.ndarray, " k"]:
    """|AUC − 0.5| of `a` against `b`, per column (ties count half)."""
    ranks = _average_ranks(np.concatenate([a, b]))
    u = ranks[: len(a)].sum(0) - len(a) * (len(a) + 1) / 2.0
    return np.abs(u / (len(a) * len(b)) - 0.5)


def statistic(
    name: str,
    delta_flip: Float[np.ndarray, "n k"],
    delta_control: Float[np.ndarray, "n k"],
    shift_flip: Float[np.ndarray, " n"],
    attribution_flip: Float[np.ndarray, "n k"] | None = None,
) -> Float[np.ndarray, " k"]:
    """The absolute ranking statistic `name` of every feature, flips against controls: |Pearson r|
    or |Spearman ρ| of Δf with the margin shift over flips, |AUC − 0.5| of flips vs controls,
    mean |Δf| over flips, or |mean attribution| over flips."""
    if name == "pearson":
        return _abs_r(delta_flip, shift_flip)
    if name == "spearman":
        return _abs_r(_average_ranks(delta_flip), _average_ranks(shift_flip[:, None])[:, 0])
    if name == "auc":
        return _abs_auc(delta_flip, delta_control)
    if name == "size":
        return np.abs(delta_flip).mean(0)
    if name == "attribution":
        if attribution_flip is None:
            raise FlipscopeError("the attribution null needs per-case attribution")
        return np.abs(attribution_flip.mean(0))
    raise FlipscopeError(f"unknown statistic {name!r}; expected one of {NULL_STATISTICS}")


@dataclass(frozen=True)
class NullTest:
    """One ranking statistic against its pair-swap null.

    Attributes:
        observed: The statistic of every feature on the unswapped pairs.
        null_max: Its largest value over features in each permutation.
        threshold: The 95th percentile (or `level`) of `null_max`: the null's top value.
        p_family: Per feature, the share of permutations whose largest value reaches its own.
    """

    observed: Float[np.ndarray, " k"]
    null_max: Float[np.ndarray, " n_perm"]
    threshold: float
    p_family: Float[np.ndarray, " k"]

    @property
    def beats(self) -> Bool[np.ndarray, " k"]:
        """Features whose statistic exceeds the null's top value."""
        return self.observed > self.threshold


def _swapped_maxima(
    name: str,
    swaps: Bool[np.ndarray, "n_perm pair"],
    flip: Float[np.ndarray, "pair k"],
    control: Float[np.ndarray, "pair k"],
    shift_flip: Float[np.ndarray, " pair"],
    shift_control: Float[np.ndarray, " pair"],
) -> Float[np.ndarray, " n_perm"]:
    """The largest statistic over features in each permutation, for every permutation at once.

    Swapping rows changes sums linearly — Σ pseudo-flip = Σ flip + swaps @ (control − flip) — so
    size, attribution, AUC (ranks in the pooled set, which no swap changes) and Pearson (from its
    sums) cost one matrix product per block of permutations; Spearman re-ranks per permutation."""
    n = len(flip)
    s = swaps.astype(np.float64)
    if name in ("size", "attribution"):
        a, b = (np.abs(flip), np.abs(control)) if name == "size" else (flip, control)
        return np.abs((a.sum(0) + s @ (b - a)) / n).max(1)
    if name == "auc":
        pooled = np.concatenate([flip, control])
        ranks = _average_ranks(pooled)
        r_f, r_c = ranks[:n], ranks[n:]
        u = r_f.sum(0) + s @ (r_c - r_f) - n * (n + 1) / 2.0
        return np.abs(u / (n * n) - 0.5).max(1)
    if name == "pearson":
        sx = flip.sum(0) + s @ (control - flip)
        sxx = (flip**2).sum(0) + s @ (control**2 - flip**2)
        sxy = (flip * shift_flip[:, None]).sum(0) + s @ (control * shift_control[:, None] - flip * shift_flip[:, None])
        y = np.where(swaps, shift_control, shift_flip)
        sy, syy = y.sum(1, keepdims=True), (y**2).sum(1, keepdims=True)
        cov, vx, vy = sxy - sx * sy / n, sxx - sx**2 / n, syy - sy**2 / n
        denom = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
        return np.abs(np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)).max(1)
    return np.array(
        [statistic(name, np.where(w[:, None], control, flip), np.where(w[:, None], flip, control),
                   np.where(w, shift_control, shift_flip)).max() for w in swaps]
    )  # fmt: skip


def pair_swap_nulls(
    delta_flip: Float[np.ndarray, "pair k"],
    delta_control: Float[np.ndarray, "pair k"],
    shift_flip: Float[np.ndarray, " pair"],
    shift_control: Float[np.ndarray, " pair"],
    *,
    attribution_flip: Float[np.ndarray, "pair k"] | None = None,
    attribution_control: Float[np.ndarray, "pair k"] | None = None,
    statistics: tuple[str, ...] = NULL_STATISTICS,
    n_perm: int = 500,
    level: float = 0.95,
    seed: int = 0,
    block: int = 64,
    rank_perms: int = 100,
) -> dict[str, NullTest]:
    """Every statistic in `statistics` against its null of flips and controls swapped within pairs
    (row i of each `*_control` array belongs to the flip in row i). `attribution` is skipped when
    no attribution is given. Permutations run in blocks of `block`, so memory stays at
    `block` × features whatever the dictionary's width. Spearman re-ranks every feature per
    permutation (0.15 s at 16k features and 160 pairs, `benchmarks/bench_nulls.py`), so its null
    takes the first `rank_perms` permutations only."""
    with_attr = attribution_flip is not None and attribution_control is not None
    names = [name for name in statistics if name != "attribution" or with_attr]
    swaps = np.random.default_rng(seed).random((n_perm, len(delta_flip))) < 0.5
    tests = {}
    for name in names:
        flip, control = (
            (attribution_flip, attribution_control) if name == "attribution" else (delta_flip, delta_control)
        )
        observed = statistic(name, flip, control, shift_flip, flip)
        null = np.concatenate(
            [_swapped_maxima(name, swaps[i : i + block], flip, control, shift_flip, shift_control)
             for i in range(0, n_perm, block)]
        )  # fmt: skip
        tests[name] = NullTest(
            observed=observed,
            null_max=null,
            threshold=float(np.quantile(null, level)),
            p_family=(1 + (null[None, :] >= observed[:, None] - 1e-12).sum(1)) / (n_perm + 1),
        )
    return tests
