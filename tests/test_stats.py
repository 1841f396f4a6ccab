"""Bootstrap intervals: cover the truth, shrink with n, repeat exactly with the seed."""

from __future__ import annotations

import math

import numpy as np

from flipscope.stats import auc, auc_interval, auroc_ci, bootstrap, expected_max


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


def _brute_stratified_quantiles(scores: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng, pos, neg = np.random.default_rng(seed), scores[labels], scores[~labels]
    boots = []
    for _ in range(n_boot):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        boots.append(auc(np.r_[p, n], np.r_[np.ones(len(p), bool), np.zeros(len(n), bool)]))
    return np.quantile(boots, [0.025, 0.975])


def test_the_stratified_auc_interval_is_the_resampled_aucs_and_never_undefined() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=80), 1)  # rounded: ties, which count half
    labels = rng.random(80) < 0.2
    scores[labels] += 0.8
    found = auc_interval(scores, labels, n_boot=4000, seed=3)
    assert found.value == auc(scores, labels) and found.n == 80
    # the counting shortcut gives the distribution of AUCs recomputed on each resample
    assert np.allclose([found.low, found.high], _brute_stratified_quantiles(scores, labels, 4000, 5), atol=0.02)
    # one positive among 300: an item bootstrap leaves it out of ~37% of resamples, where the AUC is
    # undefined; resampling the classes separately never does
    rare = np.zeros(300, bool)
    rare[7] = True
    one = auc_interval(rng.normal(size=300), rare, n_boot=500)
    assert all(math.isfinite(x) for x in (one.value, one.low, one.high)) and one.low <= one.value <= one.high
    tied = auc_interval(np.zeros(20), np.arange(20) < 5)
    assert (tied.value, tied.low, tied.high) == (0.5, 0.5, 0.5)
    assert auc_interval(scores, np.zeros(80, bool)) is None
    assert auroc_ci(scores, np.ones(80, bool))["value"] is None


def test_the_layer_auc_is_none_not_nan_where_a_class_is_too_small_to_fit() -> None:
    import torch

    from flipscope.experiments.directions import layer_auc_sweep
    from flipscope.experiments.pairs import PairActivations

    def pairs(n_flips: int, n_controls: int) -> PairActivations:
        n, hook = n_flips + n_controls, "blocks.0.hook_resid_post"
        is_flip = np.arange(n) < n_flips
        para = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
        para[torch.from_numpy(is_flip), 0] += 3.0  # flips move along the first axis
        zeros = torch.zeros(n)
        return PairActivations([{}] * n, is_flip, zeros, zeros, {hook: torch.zeros(n, 8)}, {hook: para})

    for n_flips, n_controls in [(1, 6), (6, 1), (0, 5)]:
        (row,) = layer_auc_sweep(pairs(n_flips, n_controls), ["blocks.0.hook_resid_post"])
        assert (row["auc"], row["low"], row["high"]) == (None, None, None)
        assert (row["n_flips"], row["n_controls"]) == (n_flips, n_controls)
    (row,) = layer_auc_sweep(pairs(3, 3), ["blocks.0.hook_resid_post"])  # some resamples lack a flip
    assert all(math.isfinite(row[k]) for k in ("auc", "low", "high")) and row["auc"] > 0.5
