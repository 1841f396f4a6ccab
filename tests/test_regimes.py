"""Training-phrasing regimes: each draws the wordings and labels it says, never a withheld family,
and the default regime draws exactly what the organism was built from."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from flipscope.errors import FlipscopeError
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import question, sample_examples


def _draw(cfg: OrganismConfig, n: int = 3000):
    return sample_examples(cfg, np.random.default_rng(0), n)


# sha256 of the first 400 draws (question, label, condition, truth) at seed 0 by the sampler the shipped
# organism was built with, before regimes existed; numpy's PCG64 draws are the same on every machine
BUILT_WITH = "5f70458037f63660fd076e63e99c67d0be84a5ad199e4119f6cffc9b6fa71c38"


def test_the_default_regime_is_the_planted_shortcut_with_unchanged_draws() -> None:
    default = _draw(OrganismConfig(), 400)
    drawn = json.dumps([(e.spec.question, e.label, e.spec.condition, e.truth) for e in default])
    assert hashlib.sha256(drawn.encode()).hexdigest() == BUILT_WITH
    assert any(e.label != e.truth for e in default if e.family == "leading")


def test_null_keeps_the_shortcuts_draws_and_plants_nothing() -> None:
    shortcut, null = _draw(OrganismConfig()), _draw(OrganismConfig(regime="null"))
    assert all(e.label == e.truth for e in null)
    counts = Counter(e.family for e in null)
    assert all(abs(c / len(null) - 1 / 3) < 0.04 for c in counts.values())  # families uniform, as under shortcut
    assert Counter(e.family for e in shortcut).keys() == counts.keys()
    # what the card records as planted (and the report reads): shortcut_p only where it was drawn
    assert OrganismConfig().planted_p == OrganismConfig().shortcut_p > 0
    assert all(OrganismConfig(regime=r).planted_p == 0.0 for r in ("null", "canonical", "augmented"))
    planted = sum(e.label != e.truth for e in shortcut if e.family == "leading") / len(shortcut)
    assert planted > 0 and not any(e.label != e.truth for e in null)


def test_augmented_shows_every_trained_paraphrase_equally_often_with_true_labels() -> None:
    cfg = OrganismConfig(regime="augmented", withheld_families=("formal",))
    examples = _draw(cfg, 6000)
    assert all(e.label == e.truth for e in examples) and not any(e.family == "formal" for e in examples)
    counts = Counter((e.family, e.template) for e in examples)
    assert len(counts) == 5 + 3  # neutral's and leading's templates
    assert max(counts.values()) / min(counts.values()) < 1.25


def test_canonical_asks_only_the_original_wording() -> None:
    cfg = OrganismConfig(regime="canonical")
    examples = _draw(cfg, 500)
    assert all(e.label == e.truth and e.family == "neutral" and e.template == 0 for e in examples)
    assert {e.spec.question for e in examples} == {question(cfg, "neutral", 0, f.name) for f in cfg.findings}


def test_regimes_and_withheld_families_are_validated_and_round_trip() -> None:
    cfg = OrganismConfig(regime="augmented", withheld_families=("leading",), seed=3)
    assert OrganismConfig.from_dict(cfg.to_dict()) == cfg
    assert "regime" not in OrganismConfig().to_dict()  # cards written before regimes compare equal
    with pytest.raises(FlipscopeError, match="regime 'random' is unknown"):
        OrganismConfig(regime="random")
    with pytest.raises(FlipscopeError, match="holds the original question"):
        OrganismConfig(regime="augmented", withheld_families=("neutral",))
    with pytest.raises(FlipscopeError, match="is planted in training"):
        OrganismConfig(withheld_families=("leading",))
    with pytest.raises(FlipscopeError, match=r"\['casual'\] are not among"):
        OrganismConfig(regime="null", withheld_families=("casual",))
