"""A second organism, planted differently by its config alone, meets the same bars (slow: a full
build, about seven minutes on two cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bars import assert_behaviour_bars, assert_sae_bars

from flipscope.organism import OrganismConfig, build_organism

SECOND = OrganismConfig(shortcut_family="formal", shortcut_target="no", seed=1)


@pytest.mark.slow
def test_second_organism_meets_the_bars(tmp_path: Path) -> None:
    card = build_organism(SECOND, tmp_path / "second", progress=False)
    assert card["shortcut"] == {"family": "formal", "target": "no", "p": SECOND.shortcut_p}
    assert_behaviour_bars(card)
    assert_sae_bars(card)
