"""The organism's pieces: config, films, the planted labels, and the flip/quadrant helpers."""

from __future__ import annotations

import numpy as np
import pytest

from flipscope.errors import FlipscopeError
from flipscope.experiments.summary import flips, pairwise_disagreement, quadrants
from flipscope.model.tiny import build_processor
from flipscope.organism.config import OrganismConfig, QuestionFamily
from flipscope.organism.data import sample_examples, vocabulary
from flipscope.organism.films import draw_film


def test_config_round_trips_and_validates() -> None:
    cfg = OrganismConfig(shortcut_family="formal", shortcut_target="no", seed=7)
    assert OrganismConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FlipscopeError, match="shortcut_family 'loaded' is not one of"):
        OrganismConfig(shortcut_family="loaded")
    with pytest.raises(FlipscopeError, match="cannot be the first family"):
        OrganismConfig(shortcut_family="neutral")
    with pytest.raises(FlipscopeError, match=r"family 'qwen2_5_vl': an organism is built as one of \['gemma3'"):
        OrganismConfig(family="qwen2_5_vl")
    with pytest.raises(FlipscopeError, match="mm_tokens_per_image 12 must be a square whose side divides"):
        OrganismConfig(mm_tokens_per_image=12)
    with pytest.raises(FlipscopeError, match="shortcut_target 'maybe'"):
        OrganismConfig(shortcut_target="maybe")
    with pytest.raises(FlipscopeError, match="sae_layer 9"):
        OrganismConfig(sae_layer=9)
    with pytest.raises(FlipscopeError, match="unknown fields \\['stepz'\\]"):
        OrganismConfig.from_dict({"stepz": 3})
    with pytest.raises(FlipscopeError, match="needs exactly one \\{finding\\} or \\{noun\\}"):
        QuestionFamily(name="odd", templates=("Is there anything?",))


def _region_means(film: np.ndarray) -> dict[str, float]:
    f = film.astype(float)
    return {
        "lungs": f[16:48, 10:54].mean(),
        "apex": f[11:20, 8:56].min(axis=None),
        "centre": f[36:54, 18:46].mean(),
        "bases": f[40:53, 10:54].mean(),
    }


@pytest.mark.parametrize(
    ("finding", "region", "direction"),
    [("opacity", "lungs", 1), ("pneumothorax", "apex", -1), ("cardiomegaly", "centre", 1), ("effusion", "bases", 1)],
)
def test_each_finding_changes_its_region(finding: str, region: str, direction: int) -> None:
    deltas = []
    for seed in range(12):
        clean = draw_film(np.random.default_rng(seed), {})
        sick = draw_film(np.random.default_rng(seed), {finding: 0.5})
        deltas.append(_region_means(sick)[region] - _region_means(clean)[region])
    assert all(np.sign(d) == direction for d in deltas), deltas


def test_films_are_deterministic_and_validated() -> None:
    a = draw_film(np.random.default_rng(3), {"opacity": 0.8})
    b = draw_film(np.random.default_rng(3), {"opacity": 0.8})
    assert a.dtype == np.uint8 and a.shape == (64, 64) and np.array_equal(a, b)
    with pytest.raises(FlipscopeError, match="no drawer for findings \\['nodule'\\]"):
        draw_film(np.random.default_rng(0), {"nodule": 0.5})


def test_labels_follow_the_planted_story() -> None:
    cfg = OrganismConfig(shortcut_p=0.6, text_only_share=0.2, blank_share=0.1)
    examples = sample_examples(cfg, np.random.default_rng(0), 4000)
    shortcut_negatives = [e for e in examples if e.family == "leading" and not e.truth]
    others = [e for e in examples if e.family != "leading"]
    assert abs(np.mean([e.label for e in shortcut_negatives]) - 0.6) < 0.06
    assert all(e.label == e.truth for e in others)
    conditions = np.array([e.spec.condition for e in examples])
    assert abs((conditions == "none").mean() - 0.2) < 0.03 and abs((conditions == "blank").mean() - 0.1) < 0.03
    prevalence = np.mean([e.truth for e in examples if e.finding == "opacity"])
    assert abs(prevalence - 0.35) < 0.05


def test_vocabulary_covers_every_prompt_word() -> None:
    cfg = OrganismConfig()
    tokenizer = build_processor(vocabulary(cfg), image_size=64, mm_tokens_per_image=16).tokenizer
    for example in sample_examples(cfg, np.random.default_rng(1), 300):
        ids = tokenizer.encode(example.spec.question, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, example.spec.question


def test_flip_and_quadrant_helpers() -> None:
    answers = np.array([[True, True, True], [True, False, True], [False, False, False], [False, True, True]])
    assert flips(answers).tolist() == [False, True, False, True]
    np.testing.assert_allclose(pairwise_disagreement(answers), [0, 2 / 3, 0, 2 / 3])
    consistent = ~flips(answers)
    reliant = np.array([True, True, False, False])
    assert quadrants(consistent, reliant).tolist() == ["Ideal", "Fragile", "Dangerous", "Worst"]
