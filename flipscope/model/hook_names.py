"""flipscope hook names and the HF modules that fire them (per family: `flipscope.model.families`).

Names follow TransformerLens and SAE configs (`blocks.{L}.hook_resid_post`), so an SAE's
`hook_name` works as it is. What each reads, against HF's `Gemma3DecoderLayer.forward`
(Gemma 3 wraps attention and MLP in pre- *and* post-norms; Llama-style layers have no post-norms
and the attention and MLP outputs are read directly)::

    resid_pre ─┬─ input_layernorm ─ self_attn ─ post_attention_layernorm ══ attn_out
               └──────────────────────────────────────────────────────── + ─► resid_mid
    resid_mid ─┬─ pre_feedforward_layernorm ─ mlp ─ post_feedforward_layernorm ══ mlp_out
               └──────────────────────────────────────────────────────────── + ─► resid_post

- `blocks.{L}.hook_resid_pre`: the decoder layer's input (= `hook_resid_post` of L−1; for L=0
  the token embeddings with the image features scattered in, scaled by √d_model).
- `blocks.{L}.hook_attn_out`: the output of `post_attention_layernorm`, i.e. exactly what
  attention adds to the residual stream.
- `blocks.{L}.attn.hook_z`: the input of `self_attn.o_proj`, every head's output concatenated
  (`[batch pos n_heads·d_head]`), the site of GemmaScope 2's attention SAEs.
- `blocks.{L}.hook_mlp_out`: the output of `post_feedforward_layernorm`, what the MLP adds.
- `blocks.{L}.ln1_post.hook_in`, `blocks.{L}.ln2_post.hook_in` (post-norm families only): the
  inputs of `post_attention_layernorm` and `post_feedforward_layernorm`, i.e. `o_proj`'s and
  `down_proj`'s outputs (TransformerLens calls those norms `ln1_post` and `ln2_post`).
- `blocks.{L}.hook_resid_post`: the decoder layer's output (HF `hidden_states[L+1]` for every
  layer but the last, whose HF hidden state is taken after the final norm).
- `ln_final.hook_normalized`: the final RMSNorm's output (what the unembedding reads).
- `vision.blocks.{i}.hook_resid_post`: vision encoder layer i's output (SigLIP, CLIP, Qwen's ViT).
- `vision.hook_out`: SigLIP's output after `post_layernorm` (`[n_images, n_patches, d_vision]`;
  Gemma 3 only: LLaVA reads a middle layer of its tower, Qwen2.5-VL merges patches first).
- `projector.hook_out`: the multimodal projector's output, the image soft tokens as the
  language model receives them (`[n_images, n_image_tokens, d_model]`).
"""

from __future__ import annotations

from torch import nn

from flipscope.model.families import HookSite, family_of

__all__ = [
    "GEMMASCOPE_SITES",
    "HookSite",
    "attention_heads",
    "attn_pattern",
    "attn_z",
    "hook_sites",
    "hook_width",
    "resid_post",
]

# a GemmaScope 2 folder's site word (`resid_post/layer_17_...`) → the hook sae-lens gives its SAEs
GEMMASCOPE_SITES = {"resid_post": "hook_resid_post", "attn_out": "attn.hook_z", "mlp_out": "hook_mlp_out"}


def hook_sites(hf_model: nn.Module, family: str | None = None) -> dict[str, HookSite]:
    """Hook name → site for an HF model of any family (`flipscope.model.families`; by its config's
    `model_type` unless `family` names one)."""
    return family_of(hf_model.config, family).sites(hf_model)


def attn_z(layer: int) -> str:
    """The hook of decoder layer `layer`'s concatenated head outputs (the input of `o_proj`)."""
    return f"blocks.{layer}.attn.hook_z"


def attn_pattern(layer: int) -> str:
    """The hook of decoder layer `layer`'s attention weights, `[batch head query key]`."""
    return f"blocks.{layer}.attn.hook_pattern"


def resid_post(layer: int) -> str:
    """The hook name of decoder layer `layer`'s output, as SAE configs name it."""
    return f"blocks.{layer}.hook_resid_post"


def attention_heads(hf_model: nn.Module) -> tuple[int, int]:
    """The language model's query heads and their width (8 × 256 on Gemma 3 4B)."""
    config = hf_model.config
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    return heads, int(getattr(text, "head_dim", None) or text.hidden_size // heads)


def hook_width(hf_model: nn.Module, hook: str, d_model: int) -> int:
    """The last dimension of a decoder hook's tensor: `d_model`, or for `attn.hook_z` the heads'
    width, n_heads × head_dim (2,048 on Gemma 3 4B against its 2,560)."""
    if not hook.endswith(".attn.hook_z"):
        return d_model
    heads, head_dim = attention_heads(hf_model)
    return heads * head_dim
