"""Framing vs answer readout on pairs with a known truth, and nulls that hold their level."""

from __future__ import annotations

import numpy as np
import pytest
from jaxtyping import TypeCheckError

from flipscope.errors import FlipscopeError
from flipscope.experiments.specificity import framing_specificity


def _pairs(n: int = 40, k: int = 50, framing: float = 1.0, answer: float = 1.0, stronger: float = 0.6, seed: int = 0):
    """Δf of flips and their family-matched controls: feature 0 shifts with the wording on both
    (by `stronger` more where the answer flipped), feature 1 only when the answer flips, the rest
    are noise."""
    rng = np.random.default_rng(seed)
    flip, control = rng.normal(0, 0.5, (n, k)), rng.normal(0, 0.5, (n, k))
    flip[:, 0] += framing + (stronger if framing else 0.0)
    control[:, 0] += framing
    flip[:, 1] += answer
    return flip, control


def test_the_planted_framing_and_answer_features_are_told_apart() -> None:
    found = framing_specificity(*_pairs(), n_perm=500)
    # without the decoder's alignment, a carrier that also shifts further where it flipped is labelled by both shifts
    assert found.labels[0] == "framing + readout" and found.labels[1] == "answer readout"
    assert (found.labels[2:] == "none").all()
    assert found.ranked()[0] == 0 and found.ranked()[-1] == 1 and found.found
    assert found.framing_shift[0] == pytest.approx(1.0, abs=0.25) and found.answer_shift[0] == pytest.approx(
        0.6, abs=0.3
    )
    assert found.stronger_where_flipped[0] and not found.stronger_where_flipped[1:].any()
    assert found.n_pairs == 40 and found.framing_threshold > 2


def test_with_no_framing_nothing_beats_the_null_at_its_level() -> None:
    only_answer = framing_specificity(*_pairs(framing=0.0), n_perm=300)
    assert not only_answer.found and only_answer.labels[1] == "answer readout"  # the readout still shows
    false_alarms = [framing_specificity(*_pairs(framing=0.0, answer=0.0, seed=s), n_perm=200).found for s in range(40)]
    assert np.mean(false_alarms) <= 0.125  # a family-wise 5% test: about 2 of 40 datasets at most by chance


def test_a_wording_read_alike_on_flips_and_controls_is_no_mechanism() -> None:
    """Feature 0 carries the wording, replicated, but shifts as much on the controls as on the flips:
    labelled `framing`, yet no mechanism is claimed (the null organism's entry site looks like this)."""
    alike = framing_specificity(*_pairs(stronger=0.0), n_perm=300)
    assert alike.labels[0] == "framing" and alike.replicated[0]
    assert not alike.stronger_where_flipped.any() and not alike.found
    opposite = framing_specificity(*_pairs(stronger=-0.6), n_perm=300)  # weaker where it flipped
    assert opposite.beats_null[0] and opposite.answer_t[0] < -opposite.answer_threshold and not opposite.found


def test_too_few_or_mismatched_pairs_are_refused() -> None:
    flip, control = _pairs(n=9)
    with pytest.raises(FlipscopeError, match="9 flip–control pairs; framing and answer shifts need at least 10"):
        framing_specificity(flip, control)
    with pytest.raises((FlipscopeError, TypeCheckError)):  # jaxtyping's hook catches it first under test
        framing_specificity(flip, control[:, :3])


def test_the_decoder_splits_framing_from_framing_that_writes_the_answer() -> None:
    flip, control = _pairs(k=50)
    flip[:, 2] += 2.0  # a second framing carrier, stronger
    control[:, 2] += 2.0
    cos = np.zeros(50)
    cos[1], cos[2] = 0.9, 0.8  # 2's decoder writes the answer; 0's does not
    share = np.zeros(50)
    share[0], share[2] = 0.2, 0.5
    found = framing_specificity(flip, control, answer_cos=cos, answer_cos_threshold=0.3, share=share, n_perm=300)
    assert found.labels[0] == "framing" and found.labels[2] == "framing + readout"
    assert found.labels[1] == "answer readout"
    assert list(found.framing_features) == [2, 0]  # by share of the framing direction
    assert list(found.ranked()[:2]) == [2, 0]
    with pytest.raises(FlipscopeError, match="come together"):
        framing_specificity(flip, control, answer_cos=cos)


def test_framing_share_is_the_features_part_of_the_direction() -> None:
    from flipscope.experiments.specificity import framing_share

    decoder = np.eye(4)[:3] * 2.0  # three features along the first three axes
    direction = np.array([3.0, 1.0, 0.0, 0.0])
    share = framing_share(decoder, np.array([1.5, 0.5, 7.0]), direction)
    np.testing.assert_allclose(share, [0.9, 0.1, 0.0])  # they rebuild the direction exactly; the third is off it
    assert framing_share(decoder, np.ones(3), np.zeros(4)).tolist() == [0.0, 0.0, 0.0]


def test_a_shift_from_one_question_alone_does_not_replicate() -> None:
    """Feature 0 shifts on every pair of one question and on none of the others': beyond the null
    over all pairs, but the question-disjoint halves disagree, so no framing is claimed."""
    flip, control = _pairs(framing=0.0, answer=0.0)
    groups = np.array(["film0-opacity"] * 20 + [f"film{i}-opacity" for i in range(1, 21)])
    control[:20, 0] += 1.5
    flip[:20, 0] += 2.5
    one = framing_specificity(flip, control, groups=groups, n_perm=300)
    assert one.beats_null[0] and not one.replicated[0] and not one.found
    assert sorted(one.halves) == [20, 20]
    spread = framing_specificity(flip, control, n_perm=300)  # the same pairs, each its own question
    assert spread.beats_null[0] and spread.replicated[0] and spread.found
