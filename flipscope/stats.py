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

__all__ = ["Estimate", "bootstrap"]


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
    draws = values[rng.integers(0, n, size=(n_boot, n))]
    if statistic is np.mean:
        boots = draws.mean(axis=1)
    else:
        boots = np.array([statistic(row) for row in draws])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [tail, 1.0 - tail])
    return Estimate(point, float(low), float(high), n)
