"""The framing verdict: pairs read from the bank's `control_for`, a mechanism claimed only when a
feature shifts on same-family non-flips beyond the null, further where flipped, and the flips lie
beyond the wording's reach; nothing claimed from too few pairs."""

from __future__ import annotations

import numpy as np
import pytest

from flipscope.errors import FlipscopeError
from flipscope.experiments.framing import control_pairs, framing_analysis
from flipscope.experiments.reach import wording_reach


def _cases(n_flips: int, n_controls: int, flip_margin: float = -3.0) -> list[dict]:
    """Flips from `flip_margin` (no→yes), controls from +2, two strays; every case has its margin."""
    flips = [{"id": f"q{i}/p1", "direction": "no→yes", "original_margin": flip_margin} for i in range(n_flips)]
    controls = [{"id": f"c{i}/p2", "control_for": f"q{i}/p1", "original_margin": 2.0} for i in range(n_controls)]
    strays = [{"id": "x/p3", "original_margin": 1.0}, {"id": "y/p1", "control_for": "gone/p9", "original_margin": 1.0}]
    return [*flips, *controls, *strays]


def _bank(n: int = 40, k: int = 30, framing: float = 1.0, stronger: float = 0.6, seed: int = 1, flip_margin=None):
    """Δf, Δmargin and cases of `n` pairs: flips shifted by about +5 from margins of about −3 (or
    `flip_margin`), beyond the controls' reach (|Δm| ~ N(0, 1): about 2)."""
    rng = np.random.default_rng(seed)
    cases = _cases(n, n)
    for case, m in zip(cases[:n], rng.uniform(-4.0, -2.5, n) if flip_margin is None else flip_margin, strict=True):
        case["original_margin"] = float(m)
    delta = rng.normal(0, 0.5, (len(cases), k))
    delta[: 2 * n, 0] += framing  # the wording moves feature 0 on flips and their controls,
    delta[:n, 0] += stronger if framing else 0.0  # more where the answer flipped
    delta[:n, 1] += 2.0  # feature 1 moves only where the answer flipped
    shift = np.concatenate([rng.normal(5, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, 2)])
    return delta, shift, cases


def test_pairs_come_from_control_for_and_skip_strays() -> None:
    flips, controls = control_pairs(_cases(3, 2))
    assert flips.tolist() == [0, 1] and controls.tolist() == [3, 4]
    flips, controls = control_pairs([{"id": "a/p1", "direction": "yes→no"}, {"id": "b/p1"}])
    assert flips.size == controls.size == 0


def test_a_planted_framing_is_claimed_and_the_readout_named() -> None:
    delta, shift, cases = _bank()
    found = framing_analysis(delta, shift, cases, "blocks.2.hook_resid_post", n_perm=200)
    assert found.found and found.n_pairs == 40
    assert found.verdict.startswith(
        "Feature 0 carries the wording at blocks.2.hook_resid_post (feature 0 also writes the answer): it shifts on"
    )
    assert (
        "and again on question-disjoint halves; feature 0 shifts further the same way where the answer" in found.verdict
    )
    assert found.verdict.endswith("Feature 1 moves with the answer only (answer readout).")
    alike = framing_analysis(*_bank(stronger=0.0), "blocks.2.hook_resid_post", n_perm=200)
    assert not alike.found and alike.specificity.labels[0] == "framing"
    assert alike.verdict.startswith("No framing mechanism was found at blocks.2.hook_resid_post: feature 0 carries")
    assert "but no more where the answer flipped than on the flips' own controls" in alike.verdict
    assert (
        "of the 40 flips with a same-family control were answers further from a margin of 0 than the wording moves 95%"
        in found.verdict
    )
    out = found.to_dict()
    assert out["reach"]["beyond"] and out["reach"]["share_beyond"]["low"] > 0.5
    assert out["thresholds"]["answer_cos"] is None and set(out["nulls"]) == {"pearson", "spearman", "auc", "size"}


def test_no_framing_no_claim() -> None:
    delta, shift, cases = _bank(framing=0.0)
    found = framing_analysis(delta, shift, cases, "blocks.2.hook_resid_post", n_perm=200)
    assert not found.found
    assert found.verdict.startswith("No framing mechanism was found at blocks.2.hook_resid_post: no feature shifts")
    assert "nan" not in found.verdict


def test_too_few_pairs_or_unmatched_controls_claim_nothing() -> None:
    delta, shift, cases = _bank(n=9)
    few = framing_analysis(delta, shift, cases, "h", n_perm=50)
    assert not few.found and few.specificity is None  # no claim; the swap nulls still say what r is worth
    assert set(few.nulls) == {"pearson", "spearman", "auc", "size"} and few.to_dict()["n_pairs"] == 9
    assert "only 9 flips have a family-matched control (at least 10 are needed)" in few.verdict
    unmatched = [{k: v for k, v in c.items() if k != "control_for"} for c in cases]
    none = framing_analysis(delta, shift, unmatched, "h", n_perm=50)
    assert "not family-matched (curate with --match family)" in none.verdict


def test_a_wording_effect_of_one_question_is_named_but_not_claimed() -> None:
    delta, shift, cases = _bank(framing=0.0)
    for i, case in enumerate(cases):  # half the pairs come from one film; the rest from one each
        case["question_id"] = "film0-opacity" if i % 40 < 20 else f"film{i % 40}-opacity"
    delta[[*range(20), *range(40, 60)], 0] += 1.5
    found = framing_analysis(delta, shift, cases, "blocks.2.hook_resid_post", n_perm=200)
    assert not found.found and found.specificity.beats_null[0]
    assert found.verdict.startswith(
        "No framing mechanism was found at blocks.2.hook_resid_post: feature 0 shifts on the 40 same-family"
    )
    assert "but not again on question-disjoint halves of 20 and 20 pairs" in found.verdict
    assert found.to_dict()["replication"] == {"halves": [20, 20], "beating_null": [0], "replicated": []}


def test_near_boundary_flips_are_named_but_claim_no_mechanism() -> None:
    """The null organism's trap: the same features, shifting further where flipped, but the flips are
    answers that sat at a margin of about 0, which the wording's ordinary reach tips over."""
    margins = np.random.default_rng(3).uniform(-0.3, -0.05, 40)
    delta, shift, cases = _bank(flip_margin=margins)
    near = framing_analysis(delta, shift, cases, "blocks.2.hook_resid_post", n_perm=200)
    planted = framing_analysis(*_bank(), "blocks.2.hook_resid_post", n_perm=200)
    assert planted.found and near.specificity.stronger_where_flipped[0]  # the feature-level tests alike
    assert not near.found and near.reach.share.high < 0.5 and near.reach.flip_margin < 0.3
    assert near.verdict.startswith("No framing mechanism was found at blocks.2.hook_resid_post: feature 0 carries")
    assert "and feature 0 shifts further the same way where the answer flipped" in near.verdict
    assert "but the flips are near-boundary answers: only 0.000 [0.000, 0.000] of the 40 flips" in near.verdict
    assert near.verdict.endswith("Feature 1 moves with the answer only (answer readout).")
    assert not near.to_dict()["reach"]["beyond"]


def test_the_reach_is_the_controls_95th_percentile_and_resamples_questions() -> None:
    margin = np.array([-3.0, -0.5, 0.2, -4.0, 1.0, 1.0, 1.0, 1.0])
    shift = np.array([5.0, 1.0, -1.0, 6.0, 0.1, -0.2, 0.3, -2.0])
    flips, controls = np.arange(4), np.arange(4, 8)
    reach = wording_reach(margin, shift, flips, controls, ["a", "b", "c", "d"], n_boot=200)
    assert reach.reach == pytest.approx(np.quantile([0.1, 0.2, 0.3, 2.0], 0.95))
    assert reach.share.value == 0.5 and reach.share.n == 4 and reach.flip_margin == pytest.approx(1.75)
    one = wording_reach(margin, shift, flips, controls, ["a"] * 4, n_boot=200)  # one question: nothing to resample
    assert one.share.low == one.share.high == 0.5
    assert "0.500 [" in reach.sentence() and "(1.74 logits)" in reach.sentence()


def test_a_case_without_its_original_margin_is_refused_by_name() -> None:
    delta, shift, cases = _bank()
    del cases[3]["original_margin"]
    with pytest.raises(FlipscopeError, match=r"case 'q3/p1': original_margin must be a finite number"):
        framing_analysis(delta, shift, cases, "h", n_perm=50)
    cases[3]["original_margin"] = float("nan")
    with pytest.raises(FlipscopeError, match="got nan"):
        framing_analysis(delta, shift, cases, "h", n_perm=50)


def test_a_curation_floor_above_the_reach_leaves_the_question_open() -> None:
    """A bank that kept only flips at least `min_margin` from 0 makes every flip "beyond" a reach
    below that floor, planted or not: the claim is refused, and the verdict says how to curate."""
    delta, shift, cases = _bank()
    reach = framing_analysis(delta, shift, cases, "h", n_perm=200).reach.reach
    floored = framing_analysis(delta, shift, cases, "h", min_margin=reach + 0.1, n_perm=200)
    assert floored.reach.share.value == 1.0 and not floored.reach.informative and not floored.found
    assert floored.verdict.startswith("No framing mechanism can be claimed at h: feature 0 carries the wording")
    assert f"at least {reach + 0.1:.2f} from a margin of 0, beyond the wording's reach" in floored.verdict
    assert "(curate with a lower --min-margin)" in floored.verdict
    assert floored.to_dict()["reach"]["informative"] is False
    assert framing_analysis(delta, shift, cases, "h", min_margin=reach - 0.1, n_perm=200).found
