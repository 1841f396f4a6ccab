"""Bootstrap intervals: cover the truth, shrink with n, repeat exactly with the seed."""

from __future__ import annotations

import math

import numpy as np

from flipscope.stats import bootstrap, expected_max


def test_interval_covers_and_shrinks() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap(rng.random(100) < 0.3)
    large = bootstrap(rng.random(4000) < 0.3)
    for estimate in (small, large):
        assert estimate.low <= estimate.value <= estimate.high
        assert estimate.low < 0.3 < estimate.high
    assert (large.high - large.low) < (small.high - small.low) / 4
    # Normal approximation of a share's 95% interval: ±1.96·sqrt(p(1-p)/n).
    assert abs((large.high - large.low) - 2 * 1.96 * math.sqrt(0.3 * 0.7 / 4000)) < 0.005


def test_seeded_and_degenerate_cases() -> None:
    values = np.arange(20.0)
    assert bootstrap(values, seed=3) == bootstrap(values, seed=3)
    median = bootstrap(values, np.median)
    assert median.value == 9.5 and median.low < 9.5 < median.high
    one = bootstrap(np.array([2.0]))
    assert (one.value, one.low, one.high, one.n) == (2.0, 2.0, 2.0, 1)
    assert math.isnan(bootstrap(np.array([])).value)
    assert str(bootstrap(np.array([0.0, 1.0]), seed=0)).startswith("0.500 [")


def test_bootstrap_in_bounded_chunks_equals_one_draw(monkeypatch) -> None:
    import flipscope.stats as st

    values = np.random.default_rng(1).random(4001)
    chunked = (bootstrap(values, seed=3), bootstrap(values, np.median, n_boot=301, seed=3))
    assert len(st._chunks(2000, len(values))) > 1  # the budget really splits this draw
    monkeypatch.setattr(st, "_RESAMPLE_BUDGET", 1 << 40)
    assert (bootstrap(values, seed=3), bootstrap(values, np.median, n_boot=301, seed=3)) == chunked


def test_expected_max_is_the_mean_best_of_every_subset() -> None:
    import itertools

    import pytest

    values = np.random.default_rng(3).normal(size=9)
    for n in (1, 3, 9):
        brute = np.mean([max(c) for c in itertools.combinations(values, n)])
        assert expected_max(values, n) == pytest.approx(brute, rel=1e-12)
    assert expected_max(values, 1) == pytest.approx(values.mean())
    with pytest.raises(ValueError, match="the best of 10 needs at least 10 draws; there are 9"):
        expected_max(values, 10)
