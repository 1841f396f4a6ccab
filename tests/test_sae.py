"""SAE loading: raw GemmaScope 2 folders, sae-lens folders and releases, checked against the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import save_file

from flipscope.errors import FlipscopeError
from flipscope.model import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism import default_organism_dir
from flipscope.sae.encode import encode_with_error
from flipscope.sae.load import check_sae, gemmascope_folder_to_sae, load_sae


def _raw_folder(
    root: Path, layer: int, d_in: int, d_sae: int = 32, seed: int = 0, site: str = "resid_post"
) -> tuple[Path, dict]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "w_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "w_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.1,
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
        "threshold": torch.rand(d_sae, generator=generator) * 0.5,
    }
    folder = root / site / f"layer_{layer}_width_{d_sae}_l0_small"
    folder.mkdir(parents=True)
    save_file(tensors, folder / "params.safetensors")
    config = {
        "architecture": "jump_relu",
        "model_name": "gemma-v3-4b-it",
        "hf_hook_point_in": f"model.layers.{layer}.output",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tensors


@pytest.fixture(scope="module")
def organism() -> HookedVLM:
    return HookedVLM.from_pretrained(default_organism_dir())


def test_raw_gemmascope_folder_encodes_like_the_jumprelu_formula_and_sae_lens(tmp_path: Path, organism) -> None:
    folder, raw = _raw_folder(tmp_path, layer=2, d_in=organism.d_model)
    sae = load_sae(folder)
    assert check_sae(sae, organism) == "blocks.2.hook_resid_post"
    x = torch.randn(7, organism.d_model)
    pre = x @ raw["w_enc"] + raw["b_enc"]
    expected = torch.relu(pre) * (pre > raw["threshold"])  # GemmaScope's JumpReLU
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ raw["w_dec"] + raw["b_dec"])
    sae.save_model(tmp_path / "as-sae-lens")
    reloaded = SAE.load_from_disk(str(tmp_path / "as-sae-lens"))
    assert torch.equal(reloaded.encode(x), sae.encode(x))
    assert load_sae(tmp_path / "as-sae-lens").cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    features, error = encode_with_error(sae, x)
    torch.testing.assert_close(sae.decode(features) + error, x)


def test_wrong_width_and_unknown_hook_name_both_sides(tmp_path: Path, organism) -> None:
    narrow = gemmascope_folder_to_sae(_raw_folder(tmp_path / "a", layer=2, d_in=96)[0])
    with pytest.raises(FlipscopeError, match="SAE d_in 96 does not match the model's d_model 128"):
        check_sae(narrow, organism)
    deep = gemmascope_folder_to_sae(_raw_folder(tmp_path / "b", layer=17, d_in=128)[0])
    with pytest.raises(
        FlipscopeError, match=r"unknown hook name 'blocks\.17\.hook_resid_post'; valid names: .*\{0\.\.3\}"
    ):
        check_sae(deep, organism)
    hf_named = gemmascope_folder_to_sae(_raw_folder(tmp_path / "c", layer=1, d_in=128)[0], hook_name="model.layers.1")
    hf_named.cfg.metadata.hf_hook_name = "model.layers.1.output"
    assert check_sae(hf_named, organism) == "blocks.1.hook_resid_post"


def test_an_attention_sae_reads_the_heads_before_their_projection(tmp_path: Path, organism) -> None:
    """GemmaScope 2's attention SAEs read `o_proj`'s input (sae-lens: `blocks.L.attn.hook_z`); their
    width is n_heads × head_dim, which on Gemma 3 4B is not d_model."""
    from transformers import Gemma3Config

    from flipscope.model.hook_names import hook_width

    sae = load_sae(_raw_folder(tmp_path, layer=0, d_in=organism.d_model, site="attn_out")[0])
    assert check_sae(sae, organism) == "blocks.0.attn.hook_z"
    batch = organism.prompts.build([PromptSpec(question="Is there a pleural effusion?", condition="blank")])
    _, cache = organism.run_with_cache(batch, names_filter=["blocks.0.attn.hook_z"])
    z = cache["blocks.0.attn.hook_z"]
    features, error = encode_with_error(sae, z)
    torch.testing.assert_close(sae.decode(features) + error, z)
    medgemma = Gemma3Config(text_config={"hidden_size": 2560, "num_attention_heads": 8, "head_dim": 256})
    holder = torch.nn.Module()
    holder.config = medgemma
    assert hook_width(holder, "blocks.17.attn.hook_z", 2560) == 2048
    assert hook_width(holder, "blocks.17.hook_resid_post", 2560) == 2560
    wide = load_sae(_raw_folder(tmp_path / "w", layer=0, d_in=96, site="attn_out")[0])
    with pytest.raises(FlipscopeError, match=r"SAE d_in 96 does not match the model's d_model 128"):
        check_sae(wide, organism)


def test_bad_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(FlipscopeError, match="neither a sae-lens SAE"):
        load_sae(tmp_path)
    folder, raw = _raw_folder(tmp_path, layer=0, d_in=16)
    save_file({k: v for k, v in raw.items() if k != "threshold"}, folder / "params.safetensors")
    with pytest.raises(FlipscopeError, match=r"missing tensors \['threshold'\]"):
        load_sae(folder)


def test_offline_release_says_what_to_download() -> None:
    with pytest.raises(
        FlipscopeError, match=r"google/gemma-scope-2-4b-it, folder resid_post/layer_17_width_16k_l0_medium"
    ):
        load_sae("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_medium")


def test_encoding_at_last_question_and_all_positions(organism) -> None:
    from flipscope.model.prompts import PromptSpec
    from flipscope.sae.encode import encode_prompts

    sae = load_sae(default_organism_dir() / "sae")
    specs = [
        PromptSpec(question="Is there a pneumothorax?", condition="blank"),
        PromptSpec(question="Can you confirm the suspected pleural effusion?", condition="none"),
    ]
    inputs = organism.prompts.build(specs)
    _, cache = organism.run_with_cache(inputs, names_filter="blocks.2.hook_resid_post")
    acts = cache["blocks.2.hook_resid_post"]
    last = encode_prompts(organism, sae, specs)
    torch.testing.assert_close(last.features, sae.encode(acts[:, -1]))
    torch.testing.assert_close(sae.decode(last.features) + last.error, acts[:, -1])
    question = encode_prompts(organism, sae, specs, positions="question")
    tokens = organism.processor.tokenizer.convert_ids_to_tokens
    assert tokens(inputs.input_ids[0][question.mask[0]].tolist()) == ["is", "there", "a", "pneumothorax", "?"]
    assert int(question.mask[1].sum()) == 8
    full = encode_prompts(organism, sae, specs, positions="all")
    assert torch.equal(full.mask, inputs.attention_mask.bool())
    kept = full.mask[..., None]
    torch.testing.assert_close(sae.decode(full.features) * kept + full.error, acts * kept)
    assert not full.features[~full.mask].any()
    with pytest.raises(FlipscopeError, match="positions 'middle' is unknown"):
        encode_prompts(organism, sae, specs, positions="middle")


def test_feature_encoder_equals_the_full_encode(organism) -> None:
    from flipscope.sae.encode import feature_encoder

    sae = load_sae(default_organism_dir() / "sae")
    x = torch.randn(3, 5, organism.d_model) * 4
    torch.testing.assert_close(feature_encoder(sae, [38, 3, 0])(x), sae.encode(x)[..., [38, 3, 0]])
    assert (feature_encoder(sae, list(range(64)))(x) > 0).any()
