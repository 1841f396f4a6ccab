"""The controls' bound: a patch's effect on the same-family non-flips is paired, case by case, with
what their own framing words move them by, and the verdict follows the paired difference's CI."""

from __future__ import annotations

import numpy as np
import pytest

from flipscope.errors import FlipscopeError
from flipscope.experiments.control_bound import wording_bound
from flipscope.reporting.claims import wording_bound_reading


def _wording(n: int = 60, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"q{i}/p1": float(x) for i, x in enumerate(rng.lognormal(0.0, 1.0, n))}


def test_the_verdict_follows_the_paired_difference() -> None:
    own = {k: v + 1 for k, v in _wording().items()}  # every non-flip moved at least 1 by its wording
    signs = np.random.default_rng(1).choice([-1.0, 1.0], len(own))  # a change's size counts, not its sign
    wobble = 0.5 * (-1.0) ** np.arange(len(own))  # ±0.5 case by case
    cases = {
        "within": [0.8 * v for v in own.values()],
        "beyond": [v + 0.05 for v in own.values()],
        "as much": [v + w + 0.01 for v, w in zip(own.values(), wobble, strict=True)],  # 0.01 more on average
    }
    for expected, sizes in cases.items():
        changes = dict(zip(own, signs * np.array(sizes), strict=True))
        bound = wording_bound(changes, own)
        assert bound["verdict"] == expected, (expected, bound["difference"])
        assert bound["n"] == len(own) and bound["n_without_words"] == 0
        assert bound["patch"]["value"] == pytest.approx(np.mean(sizes))
        if expected == "as much":  # more on average, by a difference whose interval reaches 0
            assert bound["difference"]["value"] > 0 >= bound["difference"]["low"]


def test_cases_are_paired_by_id_not_by_order() -> None:
    """0.05 more on every case is beyond the bound; compared unpaired, the two means' intervals overlap
    and would say nothing."""
    own = _wording()
    more = {k: v + 0.05 for k, v in own.items()}
    reordered = dict(reversed(list(own.items())))
    bound = wording_bound(more, reordered)
    assert bound["verdict"] == "beyond" and bound["difference"]["value"] == pytest.approx(0.05)
    assert bound["patch"]["low"] < bound["wording"]["high"]  # the unpaired intervals overlap
    shuffled = dict(zip(own, np.random.default_rng(2).permutation(list(more.values())), strict=True))
    assert wording_bound(shuffled, own)["verdict"] == "as much"  # mispaired, the same values say less


def test_cases_without_framing_words_are_counted_and_left_out() -> None:
    own = _wording(12)
    changes = {**{k: 0.5 * v for k, v in own.items()}, "q99/p3": 40.0}  # q99 has no framing word of its own
    bound = wording_bound(changes, own)
    assert bound["n"] == 12 and bound["n_without_words"] == 1 and bound["verdict"] == "within"
    assert wording_bound({"q99/p3": 1.0}, own) is None
    assert wording_bound_reading(None).startswith("No non-flip has framing words of its own")
    with pytest.raises(FlipscopeError, match=r"case 'q0/p1': a non-finite margin change"):
        wording_bound({"q0/p1": float("nan")}, own)


def test_the_reading_says_what_the_verdict_says_and_flags_few_cases() -> None:
    own = _wording()
    within = wording_bound({k: 0.5 * v for k, v in own.items()}, own)
    beyond = wording_bound({k: v + 0.05 for k, v in own.items()}, own)
    assert "within the framing's own effect on them" in wording_bound_reading(within, "blocks.0.hook_attn_out")
    assert "under the patch at blocks.0.hook_attn_out" in wording_bound_reading(within, "blocks.0.hook_attn_out")
    assert "the patch does more than take the framing out" in wording_bound_reading(beyond)
    few = wording_bound({k: v + 0.05 for k, v in list(own.items())[:4]}, own)
    assert "(from only 4 cases)" in wording_bound_reading(few)
