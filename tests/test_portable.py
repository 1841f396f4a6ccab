"""The suite's rule for numbers recorded on another machine (`portable.py`): floats within the
tolerance, discrete outcomes equal, and an outcome decided by a number within the tolerance of its
threshold allowed either way."""

from __future__ import annotations

import copy

from portable import ATOL, mismatches


def _panel(value: float, low: float, high: float, null: float, moves: bool) -> dict:
    return {"effect": {"value": value, "low": low, "high": high, "n": 16}, "null": null, "n_random": 8, "moves": moves}


def test_floats_pass_within_the_tolerance_and_fail_beyond_it() -> None:
    recorded = {"a": 0.5, "b": [1, 2.0], "c": "yes"}
    assert mismatches({"a": 0.5 + ATOL / 2, "b": [1, 2.0], "c": "yes"}, recorded) == []
    assert mismatches({"a": 0.5 + 3 * ATOL, "b": [1, 2.0], "c": "yes"}, recorded) == ["a: 0.503, recorded 0.5"]
    assert mismatches({"a": 0.5, "b": [2, 2.0], "c": "yes"}, recorded) == ["b[0]: 2, recorded 1"]
    assert mismatches({"a": float("nan"), "b": [1, 2.0], "c": "yes"}, recorded)  # a NaN is never close


def test_an_answer_near_zero_may_come_out_either_way_and_no_other() -> None:
    recorded = {"keys": ["q/p0/image", "q/p1/image"], "answers": "yn", "margins": [0.2, -ATOL / 4]}
    near = {"keys": recorded["keys"], "answers": "yy", "margins": [0.2, ATOL / 4]}
    assert mismatches(near, recorded, "evaluation") == []
    far = {"keys": recorded["keys"], "answers": "nn", "margins": [0.2, -ATOL / 4]}
    assert mismatches(far, recorded, "evaluation") == ["evaluation.answers: 1 differ, e.g. ['q/p0/image']"]


def test_a_verdict_decided_within_the_tolerance_of_its_threshold_may_come_out_either_way() -> None:
    """The demo's entry feature whose removal interval ends 1.7e-4 below 0: on another CPU the bound
    may cross 0 and the verdict with it; a verdict its numbers decide by more must still agree."""
    recorded = {"removal": _panel(-0.02, -0.05, -1.7e-4, 0.01, True)}
    crossed = {"removal": _panel(-0.02, -0.05, 1e-4, 0.01, False)}
    assert mismatches(crossed, recorded) == []
    clear = {"removal": _panel(-0.02, -0.05, -0.01, 0.01, True)}
    flipped = copy.deepcopy(clear)
    flipped["removal"]["moves"] = False
    assert mismatches(flipped, clear) == ["removal.moves: False, recorded True"]
    near_null = {"effect": _panel(0.3, 0.1, 0.5, 0.3 - ATOL / 2, True)}
    assert mismatches({"effect": _panel(0.3, 0.1, 0.5, 0.3 + ATOL / 2, False)}, near_null) == []
    # the numbers themselves are still compared
    moved = {"removal": _panel(-0.03, -0.05, 1e-4, 0.01, False)}
    assert mismatches(moved, recorded) == ["removal.effect.value: -0.03, recorded -0.02"]


def test_a_printed_decimal_may_round_the_other_way_but_no_word_or_integer_may_differ() -> None:
    recorded = {"reading": "the first 5 feature(s) recover 0.57 [0.50, 0.64] of the margin"}
    assert mismatches({"reading": "the first 5 feature(s) recover 0.58 [0.50, 0.63] of the margin"}, recorded) == []
    for departed in (
        "the first 5 feature(s) recover 0.59 [0.50, 0.64] of the margin",  # two units
        "the first 6 feature(s) recover 0.57 [0.50, 0.64] of the margin",  # an integer
        "the first 5 feature(s) recover 0.570 [0.50, 0.64] of the margin",  # another precision
        "the first 5 feature(s) recover 0.57 [0.50, 0.64] of the flips",  # a word
    ):
        expected = f"reading: {departed!r}, recorded {recorded['reading']!r}"
        assert mismatches({"reading": departed}, recorded) == [expected]
    assert mismatches({"v": "moves it −0.12"}, {"v": "moves it -0.11"}) == []  # a printed minus either way
