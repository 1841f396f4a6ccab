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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float

from flipscope.errors import FlipscopeError

__all__ = ["NULL_STATISTICS", "NullTest", "pair_swap_nulls", "statistic"]

NULL_STATISTICS = ("pearson", "spearman", "auc", "size", "attribution")


def _ranks(x: Float[np.ndarray, "n k"]) -> Float[np.ndarray, "n k"]:
    """Column ranks (ties broken by order, which random draws of floats almost never need)."""
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(len(x), dtype=x.dtype)[:, None].repeat(x.shape[1], 1), axis=0)
    return ranks


def _abs_r(x: Float[np.ndarray, "n k"], y: Float[np.ndarray, " n"]) -> Float[np.ndarray, " k"]:
    xc, yc = x - x.mean(0), y - y.mean()
    denom = np.sqrt((xc**2).sum(0) * (yc**2).sum())
    return np.abs(np.divide((xc * yc[:, None]).sum(0), denom, out=np.zeros(x.shape[1]), where=denom > 0))


def _abs_auc(a: Float[np.ndarray, "n k"], b: Float[np.ndarray, "m k"]) -> Float[np.ndarray, " k"]:
    """|AUC − 0.5| of `a` against `b`, per column (ties count half)."""
    both = np.concatenate([a, b])
    order = np.argsort(both, axis=0, kind="stable")
    sorted_ = np.take_along_axis(both, order, axis=0)
    ranks = np.empty_like(both)
    for j in range(both.shape[1]):  # average ranks of ties, column by column (cheap next to the sort)
        _, start, counts = np.unique(sorted_[:, j], return_index=True, return_counts=True)
        mid = start + (counts - 1) / 2.0
        ranks[order[:, j], j] = np.repeat(mid, counts)
    u = ranks[: len(a)].sum(0) - len(a) * (len(a) - 1) / 2.0
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
        return _abs_r(_ranks(delta_flip), _ranks(shift_flip[:, None])[:, 0])
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
) -> dict[str, NullTest]:
    """Every statistic in `statistics` against its null of flips and controls swapped within pairs
    (row i of each `*_control` array belongs to the flip in row i). `attribution` is skipped when
    no attribution is given."""
    with_attr = attribution_flip is not None and attribution_control is not None
    names = [s for s in statistics if s != "attribution" or with_attr]
    swaps = np.random.default_rng(seed).random((n_perm, len(delta_flip))) < 0.5

    def run(swap: Bool[np.ndarray, " pair"]) -> dict[str, Float[np.ndarray, " k"]]:
        s = swap[:, None]
        pick: Callable = lambda f, c: np.where(s, c, f)  # noqa: E731
        a_f = pick(attribution_flip, attribution_control) if with_attr else None
        return {
            n: statistic(n, pick(delta_flip, delta_control), pick(delta_control, delta_flip),
                         np.where(swap, shift_control, shift_flip), a_f)
            for n in names
        }  # fmt: skip

    observed = run(np.zeros(len(delta_flip), dtype=bool))
    null = {n: np.empty(n_perm) for n in names}
    for i, swap in enumerate(swaps):
        for n, values in run(swap).items():
            null[n][i] = values.max()
    return {
        n: NullTest(
            observed=observed[n],
            null_max=null[n],
            threshold=float(np.quantile(null[n], level)),
            p_family=(1 + (null[n][None, :] >= observed[n][:, None]).sum(1)) / (n_perm + 1),
        )
        for n in names
    }
