"""`Family`: what flipscope needs to know about one HF model architecture.

A family says which HF class loads it and how its processor is read, where each hook name
fires (`sites`), how flipscope's left-padded `ModelInputs` become the keyword arguments of its
forward (`forward_kwargs`: the image-token mask's name, Qwen's multimodal rotary positions),
what stands in for the evidence when it is removed, and whether the KV-cache fast paths are
sound for it (`fast_path_off` says why not; the store header records it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from flipscope.model.families.sites import HookSite

__all__ = ["Family"]

Evidence = Literal["image", "text"]


def _no_change(hf_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    return kwargs


def text_config_cap(hf_model: nn.Module) -> float | None:
    """The text config's `final_logit_softcapping`: what Gemma 3's causal LM and PaliGemma put on
    their logits (None for models without one)."""
    return getattr(hf_model.config.get_text_config(), "final_logit_softcapping", None)


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family.

    Attributes:
        name: Its key (`gemma3`, `gemma3_text`, `llava`, `qwen2_5_vl`, `generic`).
        model_types: The `config.model_type` values it loads (empty: any, for `generic`).
        hf_class: The transformers class that loads it (`Gemma3ForConditionalGeneration`, ...).
        covers: Real checkpoints of this family (for `flipscope families` and the README).
        evidence: `image` (a VLM) or `text` (a report passage stands where the image would).
        conditions: The evidence conditions its prompts support.
        sites: Hook name → `HookSite` for a loaded HF model.
        image_mask: The forward's name for the image-token mask (`token_type_ids` for Gemma 3,
            `mm_token_type_ids` for Qwen2.5-VL), or None when the forward takes none.
        prepare: Extra translation of forward keyword arguments (Qwen2.5-VL's 3-D positions).
        fast_path_off: Why the shared-prefix and last-token KV-cache paths are unsound for this
            family (None: they are sound and used).
        images_once: Whether each distinct image may be encoded once per batch
            (`HookedVLM.distinct_images`; needs `mm_encoder_outputs` with per-image tensors).
        norm_offset: The final RMSNorm's gain is `offset + weight` (1 for Gemma, 0 for Llama/Qwen).
        logit_cap: The soft cap c the HF forward puts on its logits (c·tanh(logit/c)), or None,
            so the paths that unembed hidden states themselves (KV-cache, lens) read the margin
            the forward gives.
        processor: Loads the processor (or tokenizer) from a folder or hub id.
    """

    name: str
    model_types: tuple[str, ...]
    hf_class: str
    covers: str
    evidence: Evidence = "image"
    conditions: tuple[str, ...] = ("image", "blank", "none", "swap")
    sites: Callable[[nn.Module], dict[str, HookSite]]
    image_mask: str | None = None
    prepare: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] = _no_change
    fast_path_off: str | None = None
    images_once: bool = False
    norm_offset: float = 0.0
    logit_cap: Callable[[nn.Module], float | None] = text_config_cap
    processor: Callable[[str], Any] = field(repr=False)

    def forward_kwargs(self, hf_model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """flipscope's keyword arguments (`token_type_ids` = 1 on image tokens, 1-D
        `position_ids`, `pixel_values`, extras) as this family's forward takes them."""
        out = dict(kwargs)
        mask = out.pop("token_type_ids", None)
        if mask is not None and self.image_mask is not None:
            out[self.image_mask] = mask
        return self.prepare(hf_model, out)

    def describe(self) -> dict[str, Any]:
        """The family as recorded in result headers and listed by `flipscope families`."""
        return {
            "family": self.name,
            "class": self.hf_class,
            "evidence": self.evidence,
            "conditions": list(self.conditions),
            "fast_path": "on" if self.fast_path_off is None else f"off: {self.fast_path_off}",
            "covers": self.covers,
        }
