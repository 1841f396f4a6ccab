"""Report sentences are chosen by tests on the numbers: the claim appears where the evidence holds
and disappears where it does not; no estimate prints as `nan`, and small ones say how small."""

from __future__ import annotations

import math

from flipscope.reporting.claims import (
    ablation_agreement,
    family_concentration,
    framing_entry,
    lens_reading,
    peak_layer,
    site_comparison,
)
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


def _est(value: float, half: float = 0.02, n: int = 160) -> dict:
    return {"value": value, "low": value - half, "high": value + half, "n": n}


def _patch(recovery: dict, hook: str) -> dict:
    return {"flips": {"mean_recovery": recovery, "n": recovery["n"]}, "setup": {"hook": hook}}


def test_the_entry_site_is_called_a_feature_only_when_its_recovery_is_clearly_higher() -> None:
    choice = {"chosen": {"hook": "blocks.0.hook_attn_out"}}
    main = {"discovered": _patch(_est(0.20), "blocks.2.hook_resid_post")}

    def site(recovery: dict, found: bool = True) -> dict:
        entry = {"found": found, "patched": [10, 62, 39, 29, 23], "patched_by": "framing specificity",
                 "patching": _patch(recovery, "blocks.0.hook_attn_out")}  # fmt: skip
        return {"choice": choice, "entry": entry}

    feature = site_comparison(site(_est(0.57)), {}, main)
    assert feature.startswith("At blocks.0.hook_attn_out the framing is still a feature: the 5 features")
    assert "0.570 [0.550, 0.590] at blocks.0.hook_attn_out against 0.200 [0.180, 0.220]" in feature
    same = site_comparison(site(_est(0.22, half=0.05)), {}, main)
    assert same.startswith("The two sites' features recover about as much") and "still a feature" not in same
    nothing = site_comparison(site(_est(0.57), found=False), {}, main)
    assert nothing.startswith("No framing mechanism was found at blocks.0.hook_attn_out either")
    few = site_comparison(site(_est(0.57, n=4)), {}, main)
    assert "(from only 4 cases)" in few
    assert site_comparison({"choice": None, "why": "the trace names no layer"}, {}, main).startswith(
        "No SAE site was chosen from the trace: the trace names no layer"
    )
    assert "already sits where" in site_comparison({"choice": choice, "entry": None}, {}, main)


def test_no_entry_layer_is_named_when_the_framing_words_do_not_explain_the_shift() -> None:
    upstream = {
        "n_cases": 1, "explained": False, "entry_layer": None, "corrupted_share": _est(-0.12, 0.0, n=1),
        "words": {"seen": _est(-0.1, 0.0, n=1)},
        "profile": [{"layer": 0, "framing words": _est(1.0, 0.0, n=1), "last position": _est(0.0, 0.0, n=1)}],
    }  # fmt: skip
    text = framing_entry(upstream)
    assert "do not explain the shift" in text and "reaches the answer position" not in text
    assert "(from only 1 case)" in text


def test_the_lens_names_the_first_layer_whose_ratio_is_above_one() -> None:
    def lens(lows: list[float], n_controls: int = 40) -> dict:
        rows = [{"layer": k, "ratio": _est(low + 1.0, 1.0 - 1e-9) | {"low": low}} for k, low in enumerate(lows)]
        return {"layers": rows, "n_flips": 30, "n_controls": n_controls,
                "first_divergent_layer": next((k for k, low in enumerate(lows) if low > 1), None),
                "commit_layer": {"median": 1.0, "n": 30}}  # fmt: skip

    text = lens_reading(lens([0.8, 1.3, 2.0]))
    assert "more than the same-family non-flips from layer 1 on" in text and "from layer 1 on" in text
    assert "Flips are chosen for crossing zero" in text
    flat = lens_reading(lens([0.5, 0.7, 0.9]))
    assert "no more than the same-family non-flips at any layer" in flat
    assert "no same-family non-flips" in lens_reading(lens([2.0], n_controls=0))
    assert lens_reading(None) == "The logit lens was not read."
    few = lens([0.8, 1.3]) | {"n_flips": 9}
    assert lens_reading(few).startswith("From only 9 flips, under the logit lens the flips diverge")
    one = lens_reading(lens([2.0, 3.0]) | {"n_flips": 1})
    assert one.startswith("The logit lens cannot compare 1 flip(s)") and "from layer" not in one
