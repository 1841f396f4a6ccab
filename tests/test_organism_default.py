"""The shipped default organism meets its acceptance bars, and its card is true to its weights."""

from __future__ import annotations

import hashlib

import pytest
import torch
from bars import assert_behaviour_bars, assert_sae_bars
from sae_lens import SAE

from flipscope.model import HookedVLM
from flipscope.organism import OrganismConfig, default_organism_dir, load_organism
from flipscope.organism.behaviour import margin_table, summarize
from flipscope.organism.build import aligned_features, framing_directions
from flipscope.organism.data import sample_films
from flipscope.organism.sae_train import collect_activations, sae_stats, skip_activations
from flipscope.organism.train import STREAM_SAE, STREAM_TEST, deterministic, stream


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.fixture(scope="module")
def organism():
    return load_organism()


def test_loads_through_the_user_path(organism) -> None:
    vlm, sae, card = organism
    directory = default_organism_dir()
    assert isinstance(HookedVLM.from_pretrained(directory), HookedVLM)
    assert type(SAE.load_from_disk(str(directory / "sae"))).__name__ == "JumpReLUSAE"
    assert sae.cfg.metadata.hook_name == card["hook_name"] == "blocks.2.hook_resid_post"
    assert sae.cfg.d_in == vlm.d_model
    for name, digest in card["sha256"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name


def test_behaviour_meets_the_bars(organism) -> None:
    _, _, card = organism
    assert card["build"]["seconds"] <= 600
    assert_behaviour_bars(card)


def test_sae_meets_the_bars_and_holds_the_framing_feature(organism) -> None:
    _, _, card = organism
    assert_sae_bars(card)


@pytest.mark.slow
def test_card_is_true_to_the_weights(organism) -> None:
    """Every number of the shipped card recomputed from the shipped weights (~1 min alone on two
    cores, three in the parallel suite: in `make test-all`)."""
    vlm, sae, card = organism
    cfg = OrganismConfig.from_dict(card["config"])
    with deterministic(cfg.threads):
        films = sample_films(cfg, stream(cfg, STREAM_TEST), cfg.test_items)
        measured = summarize(margin_table(vlm, cfg, films), cfg)
        rng = stream(cfg, STREAM_SAE)
        skip_activations(cfg, rng, cfg.sae_prompts)  # the SAE's training draw
        held_out = collect_activations(vlm, cfg, rng, max(cfg.sae_prompts // 5, 64))
        directions = framing_directions(vlm, cfg, films, sae)
    # the card was recorded on another machine: floats within the suite's tolerance (tests/README.md)
    assert _flat(measured) == pytest.approx(_flat(card["behaviour"]), rel=1e-3, abs=1e-3, nan_ok=True)
    assert sae_stats(sae, held_out) == pytest.approx(card["sae"], rel=1e-3, abs=1e-3)
    torch.testing.assert_close(directions["framing"], torch.tensor(card["directions"]["framing"]), atol=1e-3, rtol=0)
    recomputed = aligned_features(sae, directions)
    assert [f["feature"] for f in recomputed] == [f["feature"] for f in card["framing_features"]]
    for mine, theirs in zip(recomputed, card["framing_features"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-3)


def test_sae_splices_in_with_its_error_term(organism) -> None:
    vlm, sae, card = organism
    cfg = OrganismConfig.from_dict(card["config"])
    from flipscope.model.prompts import PromptSpec

    films = sample_films(cfg, stream(cfg, STREAM_TEST), 3)
    batch = vlm.prompts.build(
        [PromptSpec(question="Is the suspected pleural effusion there?", image=f.pixels) for f in films]
        + [PromptSpec(question="Is there a pneumothorax?", condition=c) for c in ("blank", "none")]
    )
    plain = vlm(batch)
    sae.use_error_term = True
    try:
        spliced = vlm.run_with_hooks(batch, fwd_hooks=[(card["hook_name"], lambda x, hook: sae(x))])
    finally:
        sae.use_error_term = False
    torch.testing.assert_close(spliced, plain, rtol=1e-5, atol=1e-4)
