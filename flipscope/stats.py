"""Statistics shared by every stage; every estimate flipscope prints carries its interval.

`Estimate` is a point value with a percentile-bootstrap 95% confidence interval over the
independent units (questions, cases): resampling units with replacement, `n_boot` times, with
a fixed seed so a rerun prints the same interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from jaxtyping import Bool, Float
from scipy import special, stats

__all__ = [
    "Estimate",
    "auc",
    "auc_interval",
    "auroc_ci",
    "bh_qvalues",
    "bootstrap",
    "bootstrap_means",
    "cliffs_delta",
    "correlations",
    "expected_max",
    "mann_whitney",
]


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval over `n` units."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap(
    values: Float[np.ndarray, " n"] | Bool[np.ndarray, " n"],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Point value and percentile-bootstrap interval of `statistic` over the units in `values`.

    With no units the estimate is NaN; with one unit the interval is the point.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    point = float(statistic(values))
    rng = np.random.default_rng(seed)
    boots = np.concatenate([_resampled(values, statistic, rng, size) for size in _chunks(n_boot, n)])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [tail, 1.0 - tail])
    return Estimate(point, float(low), float(high), n)


_RESAMPLE_BUDGET = 1 << 22  # values drawn at once: memory stays flat however many units there are


def _chunks(n_boot: int, n: int) -> list[int]:
    """Resamples per draw: an even count (so the generator's stream is the one a single draw of
    all `n_boot` would give), each draw holding at most about `_RESAMPLE_BUDGET` values."""
    size = max(2, (_RESAMPLE_BUDGET // n) & ~1)
    return [min(size, n_boot - start) for start in range(0, n_boot, size)]


def _resampled(values: np.ndarray, statistic: Callable[[np.ndarray], float], rng: np.random.Generator, size: int):
    draws = values[rng.integers(0, len(values), size=(size, len(values)))]
    if statistic is np.mean:
        return draws.mean(axis=1)
    return np.array([statistic(row) for row in draws])


def bootstrap_means(
    values: Float[np.ndarray, "n k"], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[Float[np.ndarray, " k"], Float[np.ndarray, " k"]]:
    """Percentile-bootstrap interval of the column means of `values`, for every column at once
    (one resampling of the rows shared by all columns, as a matrix product)."""
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), rng.integers(0, n, size=n_boot * n)), 1.0)
    boots = counts @ values / n
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [tail, 1.0 - tail], axis=0)
    return low, high


def correlations(
    x: Float[np.ndarray, "n k"], y: Float[np.ndarray, " n"], *, rank: bool = False, level: float = 0.95
) -> dict[str, Float[np.ndarray, " k"]]:
    """Pearson (or, with `rank`, Spearman) correlation of every column of `x` with `y`: r, its
    Fisher-z interval (Spearman with the Fieller 1.06 variance factor) and a two-sided p-value.

    Constant columns get r = 0 and p = 1 (they carry no information).
    """
    if rank:
        x = stats.rankdata(x, axis=0)
        y = stats.rankdata(y)
    n = len(y)
    xc = x - x.mean(0)
    yc = y - y.mean()
    denom = np.sqrt((xc**2).sum(0) * (yc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denom > 0, (xc * yc[:, None]).sum(0) / denom, 0.0)
    r = np.clip(r, -1.0, 1.0)
    df = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / np.maximum(1.0 - r**2, 1e-300))
    p = np.where(denom > 0, 2 * stats.t.sf(np.abs(t), df), 1.0)
    se = np.sqrt((1.06 if rank else 1.0) / max(n - 3, 1))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    q = stats.norm.ppf(0.5 + level / 2)
    return {"r": r, "low": np.tanh(z - q * se), "high": np.tanh(z + q * se), "p": p}


def mann_whitney(a: Float[np.ndarray, "n_a k"], b: Float[np.ndarray, "n_b k"]) -> dict[str, Float[np.ndarray, " k"]]:
    """Two-sided Mann–Whitney U test of every column, `a` against `b`, with AUC = U / (n_a n_b)
    (the chance a random row of `a` exceeds one of `b`; 0.5 = no separation)."""
    u, p = stats.mannwhitneyu(a, b, axis=0, alternative="two-sided")
    p = np.where(np.isnan(p), 1.0, p)
    return {"u": u, "auc": u / (len(a) * len(b)), "p": p}


def cliffs_delta(a: Float[np.ndarray, " n_a"], b: Float[np.ndarray, " n_b"]) -> dict[str, Any]:
    """Two groups of independent values (e.g. one per seed): Cliff's δ = P(a > b) − P(a < b) over
    every pair (±1 = fully separated, 0 = none), the two-sided Mann–Whitney p (exact when there
    are no ties; 1.0 when every value is equal) and the group sizes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError("Cliff's delta needs values in both groups")
    diff = a[:, None] - b[None, :]
    delta = float((np.sign(diff)).mean())
    p = 1.0 if np.ptp(np.concatenate([a, b])) == 0 else float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    return {"delta": delta, "p": p, "n_a": len(a), "n_b": len(b)}


def auc(scores: Float[np.ndarray, " n"], labels: Bool[np.ndarray, " n"]) -> float:
    """Area under the ROC curve of `scores` for `labels` (ties count half)."""
    ranks = stats.rankdata(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_interval(
    scores: Float[np.ndarray, " n"],
    labels: Bool[np.ndarray, " n"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate | None:
    """AUC of `scores` for `labels` with a percentile-bootstrap interval that resamples the
    positives and the negatives separately (stratified: every resample keeps both classes at their
    sizes, so no resample is undefined however rare one class is); None when a class is absent.

    Each resample's AUC comes from counts, not a re-sort: a positive beats the resampled negatives
    below it (ties count half), read from cumulative counts over the sorted negatives."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], np.sort(scores[~labels])
    n_pos, n_neg = len(pos), len(neg)
    if not n_pos or not n_neg:
        return None
    left, right = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    rng = np.random.default_rng(seed)
    boots = []
    step = max(1, _RESAMPLE_BUDGET // (n_pos + n_neg))
    for start in range(0, n_boot, step):
        size = min(step, n_boot - start)
        c = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=size)
        below = np.zeros((size, n_neg + 1))
        np.cumsum(rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=size), axis=1, out=below[:, 1:])
        boots.append((c * 0.5 * (below[:, left] + below[:, right])).sum(1) / (n_pos * n_neg))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(np.concatenate(boots), [tail, 1.0 - tail])
    return Estimate(auc(scores, labels), float(low), float(high), len(labels))


def auroc_ci(
    scores: Float[np.ndarray, " n"], labels: Bool[np.ndarray, " n"], seed: int = 0, n_boot: int = 1000
) -> dict[str, Any]:
    """AUROC of `scores` (higher = flagged) for `labels`, with a stratified bootstrap 95% CI
    (`auc_interval`); all None (never NaN) when one class is absent."""
    labels = np.asarray(labels, dtype=bool)
    found = auc_interval(scores, labels, n_boot=n_boot, seed=seed)
    values = found.to_dict() if found else {"value": None, "low": None, "high": None, "n": len(labels)}
    return values | {"n_positive": int(labels.sum())}


def bh_qvalues(p: Float[np.ndarray, " k"]) -> Float[np.ndarray, " k"]:
    """Benjamini–Hochberg q-values (false discovery rate) of a family of p-values."""
    return stats.false_discovery_control(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0), method="bh")


def expected_max(values: Float[np.ndarray, " m"], n: int) -> float:
    """The expected largest of `n` draws without replacement from `values` (m ≥ n): the unbiased
    estimate of "the best of n" from m > n draws, Σ_i C(i−1, n−1) / C(m, n) · x_(i) over the
    ascending order statistics. Far less noisy than the largest of one set of n."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    m = len(x)
    if not 1 <= n <= m:
        raise ValueError(f"the best of {n} needs at least {n} draws; there are {m}")
    i = np.arange(1, m + 1)
    log_w = special.gammaln(i) - special.gammaln(i - n + 1) - special.gammaln(n)  # log C(i−1, n−1)
    log_w = np.where(i >= n, log_w - (special.gammaln(m + 1) - special.gammaln(n + 1) - special.gammaln(m - n + 1)),
                     -np.inf)  # fmt: skip
    return float(np.sum(np.exp(log_w) * x))
