"""The framing verdict: pairs read from the bank's `control_for`, a mechanism claimed only when a
feature shifts on same-family non-flips beyond the null, and nothing claimed from too few pairs."""

from __future__ import annotations

import numpy as np

from flipscope.experiments.framing import control_pairs, framing_analysis


def _cases(n_flips: int, n_controls: int) -> list[dict]:
    flips = [{"id": f"q{i}/p1", "direction": "no→yes"} for i in range(n_flips)]
    controls = [{"id": f"c{i}/p2", "control_for": f"q{i}/p1"} for i in range(n_controls)]
    return [*flips, *controls, {"id": "x/p3"}, {"id": "y/p1", "control_for": "gone/p9"}]


def _bank(n: int = 40, k: int = 30, framing: float = 1.0, stronger: float = 0.6, seed: int = 1):
    rng = np.random.default_rng(seed)
    cases = _cases(n, n)
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
    out = found.to_dict()
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
