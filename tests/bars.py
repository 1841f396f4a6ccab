"""The organism acceptance bars, shared by the tests of the default and a second organism."""

from __future__ import annotations

from typing import Any


def assert_behaviour_bars(card: dict[str, Any]) -> None:
    b = card["behaviour"]
    assert b["neutral_accuracy"] >= 0.85
    assert min(b["neutral_accuracy_by_finding"].values()) >= 0.75
    assert b["shortcut_target_rate_on_opposite_truth"] >= 0.5
    assert 0.15 <= b["flip_rate"] <= 0.60
    assert b["flips_involving_shortcut"] >= 0.8
    assert max(b["flip_share_by_finding"].values()) <= 0.5
    assert b["blank_change_neutral"] >= 0.30
    assert b["blank_change_shortcut"] <= b["blank_change_neutral"] / 2
    assert b["quadrants"]["Ideal"]["share"] >= 0.10 and b["quadrants"]["Dangerous"]["share"] >= 0.10
    assert all(q["accuracy"] is not None for q in b["quadrants"].values())


def assert_sae_bars(card: dict[str, Any]) -> None:
    assert card["sae"]["fvu"] <= 0.2
    assert 5 <= card["sae"]["l0"] <= 60
    assert card["sae"]["dead_share"] <= 0.25
    top = card["framing_features"][0]
    assert top["aligned"] and top["share"] >= 0.1 and abs(top["cosine"]) >= 0.5
