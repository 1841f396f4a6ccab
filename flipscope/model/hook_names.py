"""The one table from flipscope hook names to the HF Gemma 3 VLM modules that fire them.

Names follow TransformerLens and SAE configs (`blocks.{L}.hook_resid_post`), so an SAE's
`hook_name` works as it is. What each reads, against HF's `Gemma3DecoderLayer.forward`
(Gemma 3 wraps attention and MLP in pre- *and* post-norms)::

    resid_pre ─┬─ input_layernorm ─ self_attn ─ post_attention_layernorm ══ attn_out
               └──────────────────────────────────────────────────────── + ─► resid_mid
    resid_mid ─┬─ pre_feedforward_layernorm ─ mlp ─ post_feedforward_layernorm ══ mlp_out
               └──────────────────────────────────────────────────────────── + ─► resid_post

- `blocks.{L}.hook_resid_pre`: the decoder layer's input (= `hook_resid_post` of L−1; for L=0
  the token embeddings with the image features scattered in, scaled by √d_model).
- `blocks.{L}.hook_attn_out`: the output of `post_attention_layernorm`, i.e. exactly what
  attention adds to the residual stream.
- `blocks.{L}.hook_mlp_out`: the output of `post_feedforward_layernorm`, what the MLP adds.
- `blocks.{L}.hook_resid_post`: the decoder layer's output (HF `hidden_states[L+1]` for every
  layer but the last, whose HF hidden state is taken after the final norm).
- `ln_final.hook_normalized`: the final RMSNorm's output (what the unembedding reads).
- `vision.blocks.{i}.hook_resid_post`: SigLIP encoder layer i's output.
- `vision.hook_out`: SigLIP's output after `post_layernorm` (`[n_images, n_patches, d_vision]`).
- `projector.hook_out`: the multimodal projector's output, the image soft tokens as the
  language model receives them (`[n_images, n_image_tokens, d_model]`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import nn

__all__ = ["HookSite", "hook_sites", "resid_post"]


class HookSite(NamedTuple):
    """Where a hook name is fired: a module's input (`hidden_states`) or its output."""

    module: nn.Module
    reads: Literal["input", "output"]


def hook_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    """Hook name → site for an HF `Gemma3ForConditionalGeneration` (transformers 5.x layout)."""
    core = hf_model.model
    lm = core.language_model
    sites: dict[str, HookSite] = {}
    for i, layer in enumerate(lm.layers):
        sites[f"blocks.{i}.hook_resid_pre"] = HookSite(layer, "input")
        sites[f"blocks.{i}.hook_attn_out"] = HookSite(layer.post_attention_layernorm, "output")
        sites[f"blocks.{i}.hook_mlp_out"] = HookSite(layer.post_feedforward_layernorm, "output")
        sites[f"blocks.{i}.hook_resid_post"] = HookSite(layer, "output")
    sites["ln_final.hook_normalized"] = HookSite(lm.norm, "output")
    vision = core.vision_tower
    vision = getattr(vision, "vision_model", vision)
    for i, layer in enumerate(vision.encoder.layers):
        sites[f"vision.blocks.{i}.hook_resid_post"] = HookSite(layer, "output")
    sites["vision.hook_out"] = HookSite(vision.post_layernorm, "output")
    sites["projector.hook_out"] = HookSite(core.multi_modal_projector, "output")
    return sites


def resid_post(layer: int) -> str:
    """The hook name of decoder layer `layer`'s output, as SAE configs name it."""
    return f"blocks.{layer}.hook_resid_post"
