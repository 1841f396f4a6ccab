"""The model-family table: every architecture flipscope hooks, how it loads, prompts and runs.

| family        | HF class                              | evidence | fast path |
| ------------- | ------------------------------------- | -------- | --------- |
| `gemma3`      | `Gemma3ForConditionalGeneration`      | image    | on        |
| `gemma3_text` | `Gemma3ForCausalLM`                   | text     | on        |
| `llava`       | `LlavaForConditionalGeneration`       | image    | on        |
| `qwen2_5_vl`  | `Qwen2_5_VLForConditionalGeneration`  | image    | off (3-D rotary positions) |
| `generic`     | any `AutoModelForImageTextToText`     | image    | off (not verified) |

`family_of(config)` picks one from `config.model_type`; `FAMILIES[name]` forces one.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from flipscope.errors import FlipscopeError
from flipscope.model.families.base import Family
from flipscope.model.families.sites import HookSite, decoder_sites, find_language_model

__all__ = ["FAMILIES", "Family", "HookSite", "family_of", "final_norm_gain", "image_token_mask"]


def _auto_processor(source: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(source, trust_remote_code=False)


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, trust_remote_code=False)


def _qwen_processor(source: str) -> Any:
    from flipscope.model.families.qwen_processor import QwenImageProcessor

    return QwenImageProcessor.from_pretrained(source)


def _gemma3_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    core = hf_model.model
    sites = decoder_sites(core.language_model)
    vision = getattr(core.vision_tower, "vision_model", core.vision_tower)
    for i, layer in enumerate(vision.encoder.layers):
        sites[f"vision.blocks.{i}.hook_resid_post"] = HookSite(layer, "output")
    sites["vision.hook_out"] = HookSite(vision.post_layernorm, "output")
    sites["projector.hook_out"] = HookSite(core.multi_modal_projector, "output")
    return sites


def _text_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    return decoder_sites(hf_model.model)


def _llava_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    core = hf_model.model
    sites = decoder_sites(core.language_model)
    vision = getattr(core.vision_tower, "vision_model", core.vision_tower)
    for i, layer in enumerate(vision.encoder.layers):
        sites[f"vision.blocks.{i}.hook_resid_post"] = HookSite(layer, "output")
    sites["projector.hook_out"] = HookSite(core.multi_modal_projector, "output")
    return sites


def _qwen_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    core = hf_model.model
    sites = decoder_sites(core.language_model)
    for i, block in enumerate(core.visual.blocks):
        sites[f"vision.blocks.{i}.hook_resid_post"] = HookSite(block, "output")
    sites["projector.hook_out"] = HookSite(core.visual.merger, "output")
    return sites


def _generic_sites(hf_model: nn.Module) -> dict[str, HookSite]:
    sites = decoder_sites(find_language_model(hf_model))
    core = getattr(hf_model, "model", hf_model)
    projector = getattr(core, "multi_modal_projector", None)
    if isinstance(projector, nn.Module):
        sites["projector.hook_out"] = HookSite(projector, "output")
    return sites


def _qwen_positions(hf_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL's 3-D multimodal rotary positions of a left-padded batch, computed by HF's own
    `get_rope_index` (per row, over real tokens), so a padded row sees its positions alone."""
    if kwargs.get("past_key_values") is not None or kwargs.get("input_ids") is None:
        return kwargs
    ids = kwargs["input_ids"]
    mm = kwargs.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    positions, _ = hf_model.model.get_rope_index(
        ids, mm, image_grid_thw=kwargs.get("image_grid_thw"), attention_mask=kwargs.get("attention_mask")
    )
    return {**kwargs, "position_ids": positions}


def _generic_kwargs(hf_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pass the image-token mask only to a forward that names it."""
    if "token_type_ids" in kwargs and "token_type_ids" not in inspect.signature(hf_model.forward).parameters:
        return {k: v for k, v in kwargs.items() if k != "token_type_ids"}
    return kwargs


def _uncapped(hf_model: nn.Module) -> None:
    """Gemma3ForConditionalGeneration returns its head's logits uncapped, whatever its text config's
    `final_logit_softcapping` says (tested against the forward)."""
    return None


_QWEN_OFF = (
    "Qwen2.5-VL's multimodal rotary positions: a suffix continues from the image grid's positions, "
    "which the KV-cache paths do not compute"
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="gemma3",
            model_types=("gemma3",),
            hf_class="Gemma3ForConditionalGeneration",
            covers="MedGemma 4B (google/medgemma-4b-it, -pt), MedGemma 1.5 4B, Gemma 3 4B/12B/27B",
            sites=_gemma3_sites,
            image_mask="token_type_ids",
            images_once=True,
            logit_cap=_uncapped,
            processor=_auto_processor,
        ),
        Family(
            name="gemma3_text",
            model_types=("gemma3_text",),
            hf_class="Gemma3ForCausalLM",
            covers="MedGemma 27B text (google/medgemma-27b-text-it), Gemma 3 270M/1B",
            evidence="text",
            conditions=("context", "none", "swap"),
            sites=_text_sites,
            processor=_tokenizer,
        ),
        Family(
            name="llava",
            model_types=("llava",),
            hf_class="LlavaForConditionalGeneration",
            covers="LLaVA-1.5 (llava-hf/llava-1.5-7b-hf), LLaVA-Med and LLaVA-Rad converted to HF format",
            sites=_llava_sites,
            processor=_auto_processor,
        ),
        Family(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            hf_class="Qwen2_5_VLForConditionalGeneration",
            covers="Lingshu 7B/32B, HuatuoGPT-Vision (Qwen2.5-VL), Qwen2.5-VL 3B/7B/32B",
            sites=_qwen_sites,
            image_mask="mm_token_type_ids",
            prepare=_qwen_positions,
            fast_path_off=_QWEN_OFF,
            processor=_qwen_processor,
        ),
        Family(
            name="generic",
            model_types=(),
            hf_class="AutoModelForImageTextToText",
            covers="any other transformers-native image-text-to-text checkpoint (decoder found by structure)",
            sites=_generic_sites,
            image_mask="token_type_ids",
            prepare=_generic_kwargs,
            fast_path_off="the generic family's KV-cache paths are not verified for this architecture",
            processor=_auto_processor,
        ),
    )
}


def family_of(config: Any, name: str | None = None) -> Family:
    """The family of an HF config (by `model_type`), or the one named `name`.

    Raises:
        FlipscopeError: `name` is not a family, or the model type is neither a known family nor
            an image-text-to-text model transformers knows.
    """
    if name is not None:
        if name not in FAMILIES:
            raise FlipscopeError(f"model family {name!r} is unknown; expected one of {', '.join(FAMILIES)}")
        return FAMILIES[name]
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return FAMILIES["generic"]
    raise FlipscopeError(
        f"model_type {model_type!r} is not a family flipscope runs ({', '.join(FAMILIES)}) "
        "nor an image-text-to-text model transformers knows; write a model adapter (--model-adapter module:Class)"
    )


def final_norm_gain(norm: nn.Module) -> torch.Tensor:
    """The final RMSNorm's effective per-channel gain: `1 + weight` for Gemma's norms, `weight` otherwise."""
    weight = norm.weight.detach().float()
    return 1.0 + weight if type(norm).__name__.startswith("Gemma") else weight


def image_token_mask(hf_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Where `input_ids` ([batch, pos]) hold the image soft tokens the projector fills (the
    config's image token id: `image_token_id`, or LLaVA's `image_token_index`); none on a text model."""
    config = hf_model.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return torch.zeros_like(input_ids, dtype=torch.bool) if token is None else input_ids == token
