"""Hook-site tables: flipscope's TransformerLens names → the HF modules that fire them, per decoder style.

Two decoder-layer styles cover the families:

- **Gemma** (`Gemma3DecoderLayer`): attention and MLP are wrapped in pre- *and* post-norms, so
  `hook_attn_out` / `hook_mlp_out` read `post_attention_layernorm` / `post_feedforward_layernorm`,
  exactly what each adds to the residual stream; `ln1_post.hook_in` / `ln2_post.hook_in` read
  those norms' inputs (the attention and MLP outputs before the post-norms, where a weight edit of
  `o_proj` / `down_proj` acts).
- **Llama** (Llama, Qwen2, Qwen2.5-VL's decoder, Mistral): pre-norms only, so they read the
  outputs of `self_attn` (its first element) and `mlp`.

In both, `attn.hook_z` is the attention output projection's input (every head's output,
concatenated: `[batch pos n_heads·d_head]`, where GemmaScope 2's attention SAEs read),
`attn.hook_pattern` the attention weights `self_attn` returns (`[batch head query key]`, read
only, under HF's eager kernel: `flipscope.model.hook_points`), `hook_resid_pre` is the layer's
input, `hook_resid_post` its output (HF `hidden_states[L+1]` for every layer but the last), and
`ln_final.hook_normalized` the final norm's output.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import nn

__all__ = ["HookSite", "decoder_sites", "find_language_model"]


class HookSite(NamedTuple):
    """Where a hook name is fired: a module's input (`hidden_states`), its output (the first
    element of a tuple), or an attention module's weights (`pattern`, the second)."""

    module: nn.Module
    reads: Literal["input", "output", "pattern"]


def decoder_sites(language_model: nn.Module) -> dict[str, HookSite]:
    """`blocks.{L}.*` and `ln_final.hook_normalized` for a decoder stack with `.layers` and `.norm`."""
    sites: dict[str, HookSite] = {}
    for i, layer in enumerate(language_model.layers):
        sites[f"blocks.{i}.hook_resid_pre"] = HookSite(layer, "input")
        if hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
            sites[f"blocks.{i}.hook_attn_out"] = HookSite(layer.post_attention_layernorm, "output")
            sites[f"blocks.{i}.hook_mlp_out"] = HookSite(layer.post_feedforward_layernorm, "output")
            # what attention and the MLP compute before the post-norms (TransformerLens's ln1_post, ln2_post)
            sites[f"blocks.{i}.ln1_post.hook_in"] = HookSite(layer.post_attention_layernorm, "input")
            sites[f"blocks.{i}.ln2_post.hook_in"] = HookSite(layer.post_feedforward_layernorm, "input")
        elif hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
            sites[f"blocks.{i}.hook_attn_out"] = HookSite(layer.self_attn, "output")
            sites[f"blocks.{i}.hook_mlp_out"] = HookSite(layer.mlp, "output")
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if isinstance(o_proj, nn.Module):  # the heads' outputs, concatenated: GemmaScope 2's attention site
            sites[f"blocks.{i}.attn.hook_z"] = HookSite(o_proj, "input")
            sites[f"blocks.{i}.attn.hook_pattern"] = HookSite(layer.self_attn, "pattern")
        sites[f"blocks.{i}.hook_resid_post"] = HookSite(layer, "output")
    sites["ln_final.hook_normalized"] = HookSite(language_model.norm, "output")
    return sites


def find_language_model(hf_model: nn.Module) -> nn.Module:
    """The decoder stack of any HF model, found by structure: the module with an `embed_tokens`
    embedding, a `norm` and the longest `layers` list (what every HF decoder-only text model has).

    Raises:
        ValueError: no module has that shape.
    """
    best: nn.Module | None = None
    for module in hf_model.modules():
        layers = getattr(module, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and isinstance(getattr(module, "embed_tokens", None), nn.Embedding)
            and isinstance(getattr(module, "norm", None), nn.Module)
            and (best is None or len(layers) > len(best.layers))
        ):
            best = module
    if best is None:
        raise ValueError(f"{type(hf_model).__name__} has no decoder stack (embed_tokens, layers, norm)")
    return best
