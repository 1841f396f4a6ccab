"""Cross-check against TransformerLens's own TransformerBridge (Gemma 3 multimodal adapter).

Two traps of transformer-lens 3.9.0 are handled here: the Bridge is booted only from a local
folder holding the processor files (if `AutoProcessor` fails it runs `pip install torchvision`,
which would replace the CPU torch; any subprocess is refused while it boots), and with images its
logits are wrong because it applies Gemma's (1 + w) RMSNorm offset to SigLIP's LayerNorms — the
test asserts the bug is still there, so it says when upstream fixes it, and that switching the
vision norms to HF's native LayerNorm makes the Bridge agree with flipscope.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.prompts import ModelInputs

LAYER = 1


def _refuse(*args, **kwargs):
    raise RuntimeError(f"TransformerBridge tried to run a subprocess: {args}")


@pytest.fixture(scope="module")
def bridge(tiny_dir: Path):
    from transformer_lens.model_bridge import TransformerBridge

    with pytest.MonkeyPatch.context() as patch:
        for name in ("check_call", "check_output", "run", "call", "Popen"):
            patch.setattr(subprocess, name, _refuse)
        booted = TransformerBridge.boot_transformers(str(tiny_dir), device="cpu")
    assert "torchvision" not in sys.modules
    return booted


@pytest.fixture(scope="module")
def eager_vlm(tiny_dir: Path) -> HookedVLM:
    # The Bridge forces eager attention; compare like with like.
    return HookedVLM.from_pretrained(tiny_dir, attn_implementation="eager")


@torch.no_grad()
def _bridge_run(bridge, inputs: ModelInputs):
    kwargs = inputs.as_kwargs()
    return bridge.run_with_cache(
        kwargs["input_ids"],
        pixel_values=kwargs.get("pixel_values"),
        token_type_ids=kwargs["token_type_ids"],
        attention_mask=kwargs["attention_mask"],
        names_filter=f"blocks.{LAYER}.hook_out",
    )


@torch.no_grad()
def _ours(vlm: HookedVLM, inputs: ModelInputs):
    logits, cache = vlm.run_with_cache(inputs, names_filter=f"blocks.{LAYER}.hook_resid_post")
    return logits, cache[f"blocks.{LAYER}.hook_resid_post"]


def _set_native_vision_norms(bridge, native: bool) -> int:
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    switched = 0
    for name, module in bridge.named_modules():
        if isinstance(module, NormalizationBridge) and name.startswith("vision_encoder"):
            module.use_native_layernorm_autograd = native
            switched += 1
    return switched


def test_text_only_matches_bridge(bridge, eager_vlm: HookedVLM) -> None:
    inputs = eager_vlm.prompts.build([PromptSpec(question="Is there an effusion?", condition="none")])
    logits, resid = _ours(eager_vlm, inputs)
    bridge_logits, bridge_cache = _bridge_run(bridge, inputs)
    torch.testing.assert_close(bridge_cache[f"blocks.{LAYER}.hook_out"], resid, rtol=0, atol=1e-6)
    torch.testing.assert_close(bridge_logits, logits, rtol=0, atol=1e-6)


def test_with_image_matches_bridge_once_its_vision_norms_are_native(bridge, eager_vlm, film_paths) -> None:
    inputs = eager_vlm.prompts.build([PromptSpec(question="Is there an effusion?", image=film_paths["gray"])])
    logits, resid = _ours(eager_vlm, inputs)
    bridge_logits, _ = _bridge_run(bridge, inputs)
    gap = float((bridge_logits - logits).abs().max())
    assert gap > 1e-3, "TransformerBridge's Gemma 3 vision norms look fixed upstream; drop the workaround"
    n_vision_norms = 2 * eager_vlm.hf_model.config.vision_config.num_hidden_layers + 1
    try:
        assert _set_native_vision_norms(bridge, True) == n_vision_norms
        bridge_logits, bridge_cache = _bridge_run(bridge, inputs)
    finally:
        _set_native_vision_norms(bridge, False)
    torch.testing.assert_close(bridge_cache[f"blocks.{LAYER}.hook_out"], resid, rtol=0, atol=1e-6)
    torch.testing.assert_close(bridge_logits, logits, rtol=0, atol=1e-6)


def test_attention_patterns_match_bridge(bridge, vlm: HookedVLM) -> None:
    """`attn.hook_pattern` of the default-kernel model (eager only while read) is TransformerLens's."""
    inputs = vlm.prompts.build([PromptSpec(question="Is there an effusion?", condition="none")])
    name = f"blocks.{LAYER}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = vlm.run_with_cache(inputs, names_filter=name)
        kwargs = inputs.as_kwargs()
        _, theirs = bridge.run_with_cache(
            kwargs["input_ids"], token_type_ids=kwargs["token_type_ids"], attention_mask=kwargs["attention_mask"],
            names_filter=name,
        )  # fmt: skip
    assert vlm.hf_model.config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(theirs[name], cache[name], rtol=0, atol=1e-6)
