"""Framing or answer readout? Per-feature tests with permutation nulls that keep the answer structure.

A flip changes two things at once: the wording (framing) and the answer. A feature that carries
the framing shifts with the wording on *every* pair of its paraphrase family, flipped or not; a
feature that reads out the answer shifts only when the answer does. With family-matched controls
(`CurationRules(match="family")`: each flip paired with a non-flip of its family and finding) the
two come apart:

- **framing shift**: mean Δf over the non-flip controls (wording changed, answer unchanged). Null:
  each control's paraphrase and original swapped at random (Δf → −Δf), the statistic the largest
  |t| over all features, so one threshold holds for the whole dictionary;
- **answer shift**: mean of Δf(flip) − Δf(its control) over the pairs. Null: flip and control
  labels swapped at random within each pair (the answer structure kept, only which side flipped
  permuted), again as the largest |t| over features.

A feature beats a null when its |t| exceeds the null's 95th percentile of the maximum. Any wording
moves some features (a model reads its words), and one borderline excess over the null is what 5% of
null models show, so a framing carrier must also **replicate**: the pairs are split in two halves by
question (no question in both), and a feature counts only where it beats the dictionary-wide null on
one half and, on the other, shifts the same way beyond a max-|t| null over the features that half
chose. The answer shift alone cannot tell a readout from a framing carrier that is simply stronger
where the answer flipped, so the decoder is read too: with `answer_cos` (the decoder row's cosine
with the logit-lens answer direction, `readout.answer_alignment`) and its null threshold, a feature
is

- `framing`: its framing shift beats the null and replicates, and its decoder does not write the answer;
- `framing + readout`: its framing shift beats the null and replicates, and its decoder writes the
  answer;
- `answer readout`: no replicated framing shift, but its shift on flips beats the null over their controls
  (it moves with the answer only);
- `none`: nothing beats a null.

The feature-level half of a framing *mechanism* (`found`) is a framing carrier that also shifts
further, the same way, on the flips than on their controls: every model reads its words, so a
wording feature alone is found in a model whose flips are noise near a margin of zero (the null
organism's entry site has them). That half is not enough: flips are chosen by their answer change,
so on near-boundary flips a feature that moves with the margin reads more strongly too;
`framing_analysis` also asks that most flips lie beyond the wording's reach (`reach`).

Without `answer_cos`, the labels rest on the two shifts alone (`framing`, `answer readout`,
`framing + readout` for both, `none`). Fewer than 10 pairs cannot be told apart from noise and
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float

from flipscope.errors import FlipscopeError

__all__ = [
    "LABELS",
    "MIN_PAIRS",
    "Specificity",
    "framing_share",
    "framing_specificity",
    "max_t_null",
    "replication",
    "split_halves",
    "t_statistic",
]

MIN_PAIRS = 10
MIN_HALF = 4  # a half with fewer pairs cannot confirm anything: the claim is not made


def t_statistic(values: Float[np.ndarray, "n k"]) -> Float[np.ndarray, " k"]:
    """One-sample t statistic of each column's mean (0 where a column does not vary)."""
    mean = values.mean(0)
    sem = values.std(0, ddof=1) / np.sqrt(len(values))
    return np.divide(mean, sem, out=np.zeros_like(mean), where=sem > 0)


def max_t_null(
    values: Float[np.ndarray, "n k"], *, n_perm: int = 1000, seed: int = 0, block: int = 64
) -> Float[np.ndarray, " n_perm"]:
    """The largest |t| over columns when each row's sign is flipped at random: the null of a
    mean of 0 in every column, calibrated for picking the best of all columns. A sign flip leaves
    each column's sum of squares unchanged, so a block of permutations is one matrix product."""
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_perm, len(values)))
    n = len(values)
    squares = (values**2).sum(0)
    out = []
    for start in range(0, n_perm, block):
        mean = signs[start : start + block] @ values / n
        var = np.clip(squares - n * mean**2, 0.0, None) / (n - 1)
        sem = np.sqrt(var / n)
        out.append(np.abs(np.divide(mean, sem, out=np.zeros_like(mean), where=sem > 0)).max(1))
    return np.concatenate(out)


def split_halves(groups: np.ndarray, seed: int = 0) -> Bool[np.ndarray, " pair"]:
    """Half A's pairs: whole groups (a pair's question) dealt, largest first in a seeded order, to
    the half with fewer pairs, so the halves are about as large and share no question."""
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    filled, in_a = [0, 0], np.zeros(len(names), dtype=bool)
    for g in order:
        half = int(filled[1] < filled[0])
        in_a[g] = half == 0
        filled[half] += int(sizes[g])
    return in_a[inverse]


def replication(
    values: Float[np.ndarray, "pair k"],
    in_a: Bool[np.ndarray, " pair"],
    *,
    n_perm: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Bool[np.ndarray, " k"]:
    """Features whose mean shift replicates across the halves: chosen on one half by the
    dictionary-wide max-|t| null, confirmed on the other (same sign, beyond the max-|t| null over
    the chosen features only), in either direction. All False when a half has fewer than
    `MIN_HALF` pairs."""
    k = values.shape[1]
    halves = (values[in_a], values[~in_a])
    if min(len(h) for h in halves) < MIN_HALF:
        return np.zeros(k, dtype=bool)
    out = np.zeros(k, dtype=bool)
    for i, (pick, check) in enumerate((halves, halves[::-1])):
        t_pick = t_statistic(pick)
        cut = np.quantile(max_t_null(pick, n_perm=n_perm, seed=seed + 2 + 2 * i), level)
        chosen = np.flatnonzero(np.abs(t_pick) > cut)
        if not len(chosen):
            continue
        t_check = t_statistic(check[:, chosen])
        confirm = np.quantile(max_t_null(check[:, chosen], n_perm=n_perm, seed=seed + 3 + 2 * i), level)
        same_way = np.sign(t_check) == np.sign(t_pick[chosen])
        out[chosen[same_way & (np.abs(t_check) > confirm)]] = True
    return out


LABELS = ("framing", "framing + readout", "answer readout", "none")


@dataclass(frozen=True)
class Specificity:
    """Per feature: the framing and answer shifts, their t statistics, the nulls' thresholds and
    the label. Arrays are indexed by feature.

    Attributes:
        framing_shift: Mean Δf over the non-flip controls.
        answer_shift: Mean of Δf(flip) − Δf(control) over the pairs.
        framing_t: t statistic of `framing_shift`; `answer_t` of `answer_shift`.
        framing_threshold: 95th percentile of the framing null's max |t| (`answer_threshold` alike).
        beats_null: Whether each framing shift beats its null on all pairs.
        replicated: Whether each framing shift replicates across question-disjoint halves.
        halves: The halves' sizes in pairs.
        labels: One of `LABELS` per feature.
        n_pairs: Flip–control pairs the statistics rest on.
        answer_cos: Decoder alignment with the answer direction, when given.
        answer_cos_threshold: Its null's top |cosine|, when given.
        share: Each feature's share of the controls' framing direction, when given (see `framing_share`).
    """

    framing_shift: Float[np.ndarray, " k"]
    answer_shift: Float[np.ndarray, " k"]
    framing_t: Float[np.ndarray, " k"]
    answer_t: Float[np.ndarray, " k"]
    framing_threshold: float
    answer_threshold: float
    labels: np.ndarray
    n_pairs: int
    beats_null: Bool[np.ndarray, " k"]
    replicated: Bool[np.ndarray, " k"]
    halves: tuple[int, int]
    answer_cos: Float[np.ndarray, " k"] | None = None
    answer_cos_threshold: float | None = None
    share: Float[np.ndarray, " k"] | None = None

    def ranked(self) -> np.ndarray:
        """Features by framing specificity: those whose framing shift beats the null (`framing` and
        `framing + readout`) first, by their share of the framing direction (or |framing t|
        without shares); then the rest by |framing t| minus |answer t|."""
        size = self.share if self.share is not None else np.abs(self.framing_t)
        carries = np.isin(self.labels, ("framing", "framing + readout"))
        key = np.where(carries, size, np.abs(self.framing_t) - np.abs(self.answer_t))
        return np.lexsort((-key, ~carries))

    @property
    def framing_features(self) -> np.ndarray:
        """Features whose framing shift beats the null (`framing` or `framing + readout`), ranked."""
        order = self.ranked()
        return order[np.isin(self.labels[order], ("framing", "framing + readout"))]

    @property
    def stronger_where_flipped(self) -> Bool[np.ndarray, " k"]:
        """Framing carriers that also shift further, the same way, where the answer flipped than on
        the flip's own control (answer |t| beyond its null): the wording is read more strongly
        where it flipped the answer."""
        carries = np.isin(self.labels, ("framing", "framing + readout"))
        same_way = np.sign(self.answer_shift) == np.sign(self.framing_shift)
        return carries & same_way & (np.abs(self.answer_t) > self.answer_threshold)

    @property
    def found(self) -> bool:
        """The feature-level half of a framing claim: some feature carries the wording beyond the
        null, replicated, and shifts further the same way where the answer flipped. A model reads
        its words at every layer, so wording features alone are found in any model; the other half
        (most flips beyond the wording's reach) is `framing_analysis`'s."""
        return bool(self.stronger_where_flipped.any())


def framing_share(
    decoder: Float[np.ndarray, "k d_model"],
    framing_shift: Float[np.ndarray, " k"],
    direction: Float[np.ndarray, " d_model"],
) -> Float[np.ndarray, " k"]:
    """How much of `direction` (the controls' mean Δresidual: the wording's effect where the answer
    held) each feature's own shift supplies: shift × decoder row · unit direction / |direction|.
    The organism card's `share`, measured on a FlipBank."""
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        return np.zeros(len(decoder))
    return framing_shift * (decoder @ (direction / norm)) / norm


def framing_specificity(
    delta_flip: Float[np.ndarray, "pair k"],
    delta_control: Float[np.ndarray, "pair k"],
    *,
    answer_cos: Float[np.ndarray, " k"] | None = None,
    answer_cos_threshold: float | None = None,
    share: Float[np.ndarray, " k"] | None = None,
    groups: np.ndarray | None = None,
    n_perm: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Specificity:
    """The framing and answer tests of the module docstring over flip–control pairs (row i of
    `delta_control` is the family-matched control of the flip in row i of `delta_flip`).
    `groups` names each pair's question, which the replication halves keep together (default:
    every pair its own).

    Raises:
        FlipscopeError: the arrays differ in shape, hold fewer than `MIN_PAIRS` pairs, or
            `answer_cos` comes without its threshold.
    """
    if delta_flip.shape != delta_control.shape:
        raise FlipscopeError(f"flip and control Δf differ in shape: {delta_flip.shape} vs {delta_control.shape}")
    if len(delta_flip) < MIN_PAIRS:
        raise FlipscopeError(
            f"{len(delta_flip)} flip–control pairs; framing and answer shifts need at least {MIN_PAIRS}"
        )
    if (answer_cos is None) != (answer_cos_threshold is None):
        raise FlipscopeError("answer_cos and answer_cos_threshold come together")
    difference = delta_flip - delta_control
    framing_t, answer_t = t_statistic(delta_control), t_statistic(difference)
    framing_null = max_t_null(delta_control, n_perm=n_perm, seed=seed)
    answer_null = max_t_null(difference, n_perm=n_perm, seed=seed + 1)  # a swap within a pair negates it
    framing_cut, answer_cut = float(np.quantile(framing_null, level)), float(np.quantile(answer_null, level))
    writes = None if answer_cos is None else np.abs(answer_cos) > answer_cos_threshold
    in_a = split_halves(np.arange(len(delta_flip)) if groups is None else np.asarray(groups), seed=seed)
    beats = np.abs(framing_t) > framing_cut
    replicated = replication(delta_control, in_a, n_perm=n_perm, level=level, seed=seed)
    return Specificity(
        framing_shift=delta_control.mean(0),
        answer_shift=difference.mean(0),
        framing_t=framing_t,
        answer_t=answer_t,
        framing_threshold=framing_cut,
        answer_threshold=answer_cut,
        labels=_labels(beats & replicated, np.abs(answer_t) > answer_cut, writes),
        n_pairs=len(delta_flip),
        beats_null=beats,
        replicated=replicated,
        halves=(int(in_a.sum()), int((~in_a).sum())),
        answer_cos=answer_cos,
        answer_cos_threshold=answer_cos_threshold,
        share=share,
    )


def _labels(
    framing: Bool[np.ndarray, " k"], answer: Bool[np.ndarray, " k"], writes: Bool[np.ndarray, " k"] | None
) -> np.ndarray:
    """The module docstring's labels from the three tests (the decoder's only when given)."""
    mixed = framing & (answer if writes is None else writes)
    readout = ~framing & answer
    return np.select([mixed, framing, readout], ["framing + readout", "framing", "answer readout"], "none").astype(
        object
    )
