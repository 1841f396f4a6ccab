"""Pair-swap nulls: a readout that tracks the margin everywhere is not a discovery; a feature that
singles out the flips is; and with nothing planted the null holds its level."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flipscope.experiments.nulls import pair_swap_nulls, statistic
from flipscope.stats import correlations, mann_whitney


def _pairs(n: int = 60, k: int = 40, seed: int = 0):
    """Flips with large margin shifts and their controls with small ones. Feature 0 reads out the
    margin shift on every case; feature 1 jumps on flips only; the rest are noise."""
    rng = np.random.default_rng(seed)
    shift_flip, shift_control = rng.normal(6, 1.5, n), rng.normal(0, 1.5, n)
    flip, control = rng.normal(0, 1, (n, k)), rng.normal(0, 1, (n, k))
    flip[:, 0] += 2 * shift_flip
    control[:, 0] += 2 * shift_control
    flip[:, 1] += 1.5
    return flip, control, shift_flip, shift_control


def test_statistics_match_the_plain_tests() -> None:
    flip, control, shift_flip, _ = _pairs()
    r = correlations(flip, shift_flip)["r"]
    np.testing.assert_allclose(statistic("pearson", flip, control, shift_flip), np.abs(r), atol=1e-12)
    rho = [stats.spearmanr(flip[:, j], shift_flip).statistic for j in range(flip.shape[1])]
    np.testing.assert_allclose(statistic("spearman", flip, control, shift_flip), np.abs(rho), atol=1e-12)
    auc = mann_whitney(flip, control)["auc"]
    np.testing.assert_allclose(statistic("auc", flip, control, shift_flip), np.abs(auc - 0.5), atol=1e-12)


def test_a_readout_that_tracks_every_margin_does_not_beat_the_null() -> None:
    flip, control, shift_flip, shift_control = _pairs()
    tests = pair_swap_nulls(flip, control, shift_flip, shift_control, n_perm=300)
    pearson = tests["pearson"]
    assert pearson.observed[0] > 0.75  # a "discovery" by its parametric p-value ...
    assert correlations(flip, shift_flip)["p"][0] < 1e-10
    assert not pearson.beats[0] and pearson.p_family[0] > 0.05  # ... that its null sees through
    auc = tests["auc"]
    assert auc.beats[1] and auc.p_family[1] < 0.01  # the flip-only feature separates flips from controls
    assert auc.beats[0]  # and so does the readout: separation is answer tracking, which the labels say
    assert set(tests) == {"pearson", "spearman", "auc", "size"}  # no attribution given, none tested


def test_with_nothing_planted_the_null_holds_its_level() -> None:
    rng = np.random.default_rng(5)
    alarms = []
    for _ in range(40):
        flip, control = rng.normal(0, 1, (30, 20)), rng.normal(0, 1, (30, 20))
        shifts = rng.normal(0, 1, (2, 30))
        tests = pair_swap_nulls(flip, control, *shifts, statistics=("pearson", "auc"), n_perm=200,
                                seed=int(rng.integers(1 << 30)))  # fmt: skip
        alarms.append(tests["pearson"].beats.any())
    assert np.mean(alarms) <= 0.15  # family-wise 5%: about 2 of 40 by chance


def test_attribution_null_needs_both_sides() -> None:
    flip, control, shift_flip, shift_control = _pairs(n=20, k=5)
    attribution = {"attribution_flip": flip, "attribution_control": control}
    tests = pair_swap_nulls(flip, control, shift_flip, shift_control, n_perm=50, **attribution)
    assert tests["attribution"].observed == pytest.approx(np.abs(flip.mean(0)))


def test_all_permutations_at_once_equal_one_at_a_time() -> None:
    from flipscope.experiments.nulls import _swapped_maxima
    from flipscope.experiments.specificity import max_t_null, t_statistic

    rng = np.random.default_rng(2)
    flip, control = rng.normal(size=(30, 20)).round(1), rng.normal(size=(30, 20)).round(1)  # with ties
    shift_flip, shift_control = rng.normal(size=30), rng.normal(size=30)
    swaps = rng.random((40, 30)) < 0.5
    for name in ("pearson", "spearman", "auc", "size", "attribution"):
        fast = _swapped_maxima(name, swaps, flip, control, shift_flip, shift_control)
        slow = [
            statistic(name, np.where(w[:, None], control, flip), np.where(w[:, None], flip, control),
                      np.where(w, shift_control, shift_flip), np.where(w[:, None], control, flip)).max()
            for w in swaps
        ]  # fmt: skip
        np.testing.assert_allclose(fast, slow, atol=1e-12, err_msg=name)
    signs = np.random.default_rng(1).choice(np.array([-1.0, 1.0]), size=(50, 30))
    slow = [np.abs(t_statistic(flip * s[:, None])).max() for s in signs]
    np.testing.assert_allclose(max_t_null(flip, n_perm=50, seed=1, block=7), slow, atol=1e-10)


def test_spearman_ranks_ties_as_the_feature_table_does() -> None:
    rng = np.random.default_rng(4)
    flip = np.where(rng.random((40, 6)) < 0.7, 0.0, rng.normal(size=(40, 6)))  # sparse codes: most cases tie at 0
    shift = rng.normal(size=40)
    expected = np.abs(correlations(flip, shift, rank=True)["r"])
    np.testing.assert_allclose(statistic("spearman", flip, flip, shift), expected, atol=1e-12)
