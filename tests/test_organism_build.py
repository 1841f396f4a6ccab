"""A reduced organism built end to end: deterministic, loadable through the user path, and its
SAE splices in without changing the model when the error term is kept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flipscope.errors import FlipscopeError
from flipscope.kernels import kernel_settings
from flipscope.model import PromptSpec
from flipscope.organism import OrganismConfig, build_organism, load_card, load_organism

REDUCED = OrganismConfig(
    text_layers=2,
    d_model=32,
    d_mlp=64,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    vision_layers=1,
    vision_d_model=16,
    image_size=32,
    mm_tokens_per_image=4,
    vision_steps=8,
    steps=12,
    batch_size=16,
    sae_layer=0,
    d_sae=64,
    sae_prompts=48,
    sae_steps=40,
    sae_batch=128,
    sae_target_l0=8.0,
    test_items=4,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("organism") / "reduced"
    return out, build_organism(REDUCED, out, progress=False)


def test_card_records_config_files_and_behaviour(built) -> None:
    out, card = built
    assert OrganismConfig.from_dict(card["config"]) == REDUCED
    assert card["hook_name"] == "blocks.0.hook_resid_post"
    assert card["build"]["kernels"] == kernel_settings()  # what trained it, portable or not
    assert {"model.safetensors", "config.json", "sae/cfg.json", "sae/sae_weights.safetensors"} <= set(card["sha256"])
    for name, digest in card["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    behaviour = card["behaviour"]
    assert behaviour["n_items"] == REDUCED.test_items * len(REDUCED.findings)
    assert set(behaviour["quadrants"]) == {"Ideal", "Fragile", "Dangerous", "Worst"}
    assert abs(sum(q["share"] for q in behaviour["quadrants"].values()) - 1.0) < 1e-9
    assert len(card["directions"]["framing"]) == REDUCED.d_model
    assert abs(card["framing_features"][0]["cosine"]) >= abs(card["framing_features"][-1]["cosine"])


def test_rebuild_gives_identical_weights(built, tmp_path: Path) -> None:
    out, _ = built
    build_organism(REDUCED, tmp_path / "again", progress=False)
    for name in ("model.safetensors", "sae/sae_weights.safetensors"):
        first, second = load_file(out / name), load_file(tmp_path / "again" / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)


def test_loads_through_the_user_path_and_sae_splices_exactly(built) -> None:
    out, card = built
    vlm, sae, loaded_card = load_organism(out)
    assert loaded_card == card
    assert sae.cfg.metadata.hook_name == card["hook_name"] and sae.cfg.d_in == vlm.d_model
    batch = vlm.prompts.build(
        [
            PromptSpec(question="Is there a pleural effusion?", condition=c, image=torch.zeros(32, 32).numpy())
            for c in ("image", "blank", "none")
        ]
    )
    plain = vlm(batch)
    sae.use_error_term = True
    try:
        spliced = vlm.run_with_hooks(batch, fwd_hooks=[(card["hook_name"], lambda x, hook: sae(x))])
        sae.use_error_term = False
        reconstructed = vlm.run_with_hooks(batch, fwd_hooks=[(card["hook_name"], lambda x, hook: sae(x))])
    finally:
        sae.use_error_term = False
    torch.testing.assert_close(spliced, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reconstructed, plain, atol=1e-5)


def test_a_llava_organism_builds_from_its_config_file_and_loads_as_llava(tmp_path: Path) -> None:
    import json

    from transformers import LlavaForConditionalGeneration
    from typer.testing import CliRunner

    from flipscope.cli import app

    config = tmp_path / "llava.json"
    config.write_text(json.dumps({**REDUCED.to_dict(), "family": "llava", "test_items": 8}))
    result = CliRunner().invoke(app, ["organism", "build", "--out", str(tmp_path / "llava"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    vlm, sae, card = load_organism(tmp_path / "llava")
    assert isinstance(vlm.hf_model, LlavaForConditionalGeneration) and vlm.family.name == "llava"
    assert card["config"]["family"] == "llava" and sae.cfg.d_in == vlm.d_model
    batch = vlm.prompts.build(
        [PromptSpec(question="Is there a pleural effusion?", condition=c, image=torch.zeros(32, 32).numpy())
         for c in ("image", "blank", "none")]
    )  # fmt: skip
    assert batch.pixel_values is not None and int((batch.input_ids == vlm.prompts.image_token_id).sum(1)[0]) == 4
    sae.use_error_term = True
    try:
        spliced = vlm.run_with_hooks(batch, fwd_hooks=[(card["hook_name"], lambda x, hook: sae(x))])
    finally:
        sae.use_error_term = False
    torch.testing.assert_close(spliced, vlm(batch), rtol=1e-5, atol=1e-5)


def test_an_entry_site_sae_is_trained_by_the_recipe_and_recorded_in_the_card(built, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from flipscope.cli import app
    from flipscope.organism.entry_sae import ENTRY_DIR, load_entry_sae, train_entry_sae

    out, _ = built
    copy = tmp_path / "organism"
    shutil.copytree(out, copy)
    entry = train_entry_sae(copy, "blocks.0.hook_attn_out")
    card = load_card(copy)
    assert card["entry_sae"] == entry and entry["d_sae"] == REDUCED.d_sae and entry["fvu"] >= 0 and entry["l0"] > 0
    for name in ("cfg.json", "sae_weights.safetensors"):
        digest = hashlib.sha256((copy / ENTRY_DIR / name).read_bytes()).hexdigest()
        assert card["sha256"][f"{ENTRY_DIR}/{name}"] == digest
    sae = load_entry_sae(copy)
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_attn_out" and sae.cfg.d_in == REDUCED.d_model
    again = tmp_path / "again"  # the same recipe through the command gives the same bytes
    shutil.copytree(out, again)
    result = CliRunner().invoke(app, ["organism", "entry-sae", "--organism", str(again)])
    assert result.exit_code == 0, result.output
    assert f"entry SAE at blocks.0.hook_attn_out: {REDUCED.d_sae} features; held-out FVU" in result.output
    assert (again / ENTRY_DIR / "sae_weights.safetensors").read_bytes() == (
        copy / ENTRY_DIR / "sae_weights.safetensors"
    ).read_bytes()
    with pytest.raises(FlipscopeError, match="has no entry-site SAE"):
        load_entry_sae(out)
