"""Held-out replication: the FlipBank split by question, features chosen on one half and patched
on the other, with both controls; on the organism the planted mechanism replicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from flipscope.data.flipbank import load_flipbank
from flipscope.errors import FlipscopeError
from flipscope.experiments.replication import replicate, split_bank
from flipscope.organism import load_organism
from flipscope.reporting.claims import beats_control, replicated, replication

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def bank():
    return load_flipbank(BANK)


def test_halves_split_by_question_with_their_controls(bank) -> None:
    a, b = split_bank(bank, seed=3)
    questions = [{c["question_id"] for c in half["flips"]} for half in (a, b)]
    assert not questions[0] & questions[1]
    assert sorted(c["id"] for c in a["flips"] + b["flips"]) == sorted(c["id"] for c in bank["flips"])
    for half in (a, b):
        ids = {c["id"] for c in half["flips"]}
        assert all(c["control_for"] in ids for c in half["controls"])
        assert half["n_flips"] == len(half["flips"]) and half["n_controls"] == len(half["controls"])
    largest = max(sum(c["question_id"] == q for c in bank["flips"]) for q in questions[0] | questions[1])
    assert abs(a["n_flips"] - b["n_flips"]) <= largest
    assert split_bank(bank, seed=3) == (a, b) and split_bank(bank, seed=4) != (a, b)
    one = dict(bank) | {"flips": [c for c in bank["flips"] if c["question_id"] == bank["flips"][0]["question_id"]]}
    with pytest.raises(FlipscopeError, match="1 question"):
        split_bank(one)


def test_the_planted_mechanism_replicates_on_held_out_flips(bank) -> None:
    vlm, sae, card = load_organism()
    runs = replicate(vlm, sae, bank, top_k=5, seed=0, progress=False)
    assert [r["direction"] for r in runs] == ["A→B", "B→A"]
    planted = {f["feature"] for f in card["framing_features"] if f["aligned"]}
    for run in runs:
        assert run["chosen_by"] == "framing specificity" and planted & set(run["features"])
        assert run["discovery_flips"] + run["held_out_flips"] == bank["n_flips"]
        assert replicated(run), run["patch"]["flips"]["mean_recovery"]
        assert 0.1 < run["patch"]["flips"]["mean_recovery"]["value"] < 0.5  # the wording's share, not the answer's
    text = replication(runs)
    assert text.startswith("The patch replicates on held-out flips in both directions.")
    for run in runs:  # the matched control's verdict is read off its own interval, whichever way it goes
        assert ("so the recovery is specific to them" in text) or (beats_control(run) is False)


def test_replication_and_specificity_are_read_off_the_intervals() -> None:
    estimate = {"value": 0.3, "low": 0.1, "high": 0.5, "n": 40}
    run = {
        "direction": "A→B",
        "features": [1],
        "chosen_by": "attribution",
        "patch": {
            "flips": {"n": 40, "mean_recovery": estimate},
            "matched_control_feature": {"mean_recovery": {"value": 0.25, "low": 0.05, "high": 0.45, "n": 40}},
        },
    }
    assert replicated(run) and beats_control(run) is False
    assert "not shown to be specific to these features" in replication([run])
    zero = {**run, "patch": {**run["patch"], "flips": {"n": 40, "mean_recovery": {**estimate, "low": -0.05}}}}
    assert not replicated(zero) and "the patch does not replicate" in replication([zero])
    few = {**run, "patch": {"flips": {"n": 6, "mean_recovery": estimate}}}
    assert not replicated(few) and "only 6 held-out flips" in replication([few])
    assert beats_control(few) is None and "no matched control feature" in replication([few])
