"""The vision tower once per distinct image of a batch.

A FlipBank's original and paraphrase prompts show the same film, so a batch of pair prompts holds
each image several times; at MedGemma's 896-px SigLIP the tower costs more than the language
model, and running it per prompt multiplies the cost of caching pairs, attribution and patching
by the number of prompts per image. Inside `HookedVLM.distinct_images()` every forward with
pixel values encodes each distinct image once and hands HF the result as `mm_encoder_outputs`
(what Gemma 3's forward accepts in place of pixel values). It stays off while any hook reads or
edits the tower or the projector (those hooks must see every row), and off by default, so a
plain forward stays bit-identical to HF's; margins under it match to float rounding (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["distinct_rows", "encode_images_once", "images_once"]

T = TypeVar("T")


def distinct_rows(pixels: Float[Tensor, "image channel height width"]) -> tuple[list[int], Int[Tensor, " image"]]:
    """The first row of each distinct image and, per row, the index of its image among those."""
    kept: list[int] = []
    inverse = torch.empty(pixels.shape[0], dtype=torch.long)
    for row in range(pixels.shape[0]):
        match = next((k for k, first in enumerate(kept) if torch.equal(pixels[row], pixels[first])), None)
        if match is None:
            match = len(kept)
            kept.append(row)
        inverse[row] = match
    return kept, inverse


def _tower_hooked(vlm: Any) -> bool:
    return any(
        point.fwd_hooks or point.bwd_hooks
        for name, point in vlm.hook_dict.items()
        if name.startswith(("vision.", "projector."))
    )


def encode_images_once(vlm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for the HF forward with each distinct image encoded once (unchanged when no image
    repeats, or when a hook is on the tower or projector)."""
    pixels = kwargs.get("pixel_values")
    if pixels is None or pixels.shape[0] < 2 or _tower_hooked(vlm):
        return kwargs
    kept, inverse = distinct_rows(pixels)
    if len(kept) == pixels.shape[0]:
        return kwargs
    encoded = vlm.hf_model.model.get_image_features(pixels[kept], return_dict=True)
    encoded.pooler_output = encoded.pooler_output[inverse.to(encoded.pooler_output.device)]
    encoded.last_hidden_state = None  # per distinct image; nothing downstream reads it
    rest = {k: v for k, v in kwargs.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": {"image": encoded}}


def images_once(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn(vlm, ...)` inside `vlm.distinct_images()` (for stages whose batches repeat images)."""

    @functools.wraps(fn)
    def wrapper(vlm: Any, *args: Any, **kwargs: Any) -> T:
        with vlm.distinct_images() if hasattr(vlm, "distinct_images") else nullcontext():
            return fn(vlm, *args, **kwargs)

    return wrapper
