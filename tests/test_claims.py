"""Report sentences are chosen by tests on the numbers: the claim appears where the evidence holds
and disappears where it does not; no estimate prints as `nan`, and small ones say how small."""

from __future__ import annotations

import math

from flipscope.reporting.claims import ablation_agreement, family_concentration, peak_layer
from flipscope.reporting.format import fmt, num


def _rate(value: float, low: float, high: float, n: int = 100) -> dict:
    return {"paraphrase_flip_rate": {"value": value, "low": low, "high": high, "n": n}}


def test_estimates_never_print_nan_and_small_ones_say_so() -> None:
    assert fmt({"value": 0.5, "low": 0.4, "high": 0.6, "n": 50}) == "0.500 [0.400, 0.600]"
    assert fmt({"value": 0.617, "low": 0.617, "high": 0.617, "n": 1}) == "0.617 [0.617, 0.617] (from only 1 case)"
    assert fmt({"value": 0.2, "low": 0.1, "high": 0.3, "n": 9}).endswith("(from only 9 cases)")
    assert fmt({"value": math.nan, "low": math.nan, "high": math.nan, "n": 0}) == "n/a"
    assert "nan" not in fmt({"value": math.nan, "low": 0.0, "high": 1.0, "n": 5}).replace("n/a", "")
    assert num(None) == num(math.nan) == "n/a" and num(0.25, "+.2f") == "+0.25"


def test_a_family_claim_needs_an_interval_above_every_other_family() -> None:
    separated = {"leading": _rate(0.4, 0.35, 0.45), "neutral": _rate(0.02, 0.0, 0.05), "formal": _rate(0.03, 0.0, 0.06)}
    assert family_concentration(separated, "leading", "planted").startswith(
        "The flips concentrate in the planted 'leading' family"
    )
    overlapping = {**separated, "formal": _rate(0.3, 0.2, 0.38)}
    assert "do not concentrate" in family_concentration(overlapping, "leading")
    few = {**separated, "leading": _rate(1.0, 1.0, 1.0, n=3)}
    assert "too few" in family_concentration(few, "leading") and "(from only 3 cases)" in family_concentration(
        few, "leading"
    )
    assert "No 'hedged' paraphrases" in family_concentration(separated, "hedged")
    for by_strategy in (overlapping, few):
        assert "The flips concentrate" not in family_concentration(by_strategy, "leading")


def test_peaks_and_agreements_are_named_only_when_they_are_numbers() -> None:
    layers = [{"hook": "blocks.0.hook_resid_post", "auc": math.nan}, {"hook": "blocks.1.hook_resid_post", "auc": 0.7}]
    assert peak_layer(layers) == "The flip-vs-control AUC peaks at 0.70 at blocks.1.hook_resid_post."
    nothing = peak_layer([{"hook": "blocks.0.hook_resid_post", "auc": math.nan}])
    assert "could not be computed" in nothing and "nan" not in nothing
    assert ablation_agreement(None) == ablation_agreement({"spearman": math.nan})
    assert "not checked" in ablation_agreement(None) and "0.990" in ablation_agreement({"spearman": 0.99})
    assert peak_layer(layers, n_flips=5) == (
        "The flip-vs-control AUC peaks at 0.70 at blocks.1.hook_resid_post (from only 5 flips)."
    )
    assert peak_layer(layers, n_flips=10) == peak_layer(layers)
    assert "(from only 4 flip cases)" in ablation_agreement({"spearman": 1.0, "n_cases": 4})
