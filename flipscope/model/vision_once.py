"""The vision tower once per distinct image of a batch.

A FlipBank's original and paraphrase prompts show the same film, so a batch of pair prompts holds
each image several times; at MedGemma's 896-px SigLIP the tower costs more than the language
model, and running it per prompt multiplies the cost of caching pairs, attribution and patching
by the number of prompts per image. Inside `HookedVLM.distinct_images()` every forward with
pixel values encodes each distinct image once and hands HF the result as `mm_encoder_outputs`
(what Gemma 3's forward accepts in place of pixel values). The last batch's encoding is kept
for the block (`ImageMemo`): a stage that runs one batch many times (the trace restores each
layer × position group in its own forward: three per layer) runs the tower on it once, not once
per forward. It stays off while any hook reads or edits the tower or the projector (those hooks
must see every row), and off by default, so a plain forward stays bit-identical to HF's; margins
under it match to float rounding (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["ImageMemo", "distinct_rows", "encode_images_once", "images_once"]

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


@dataclass(frozen=True)
class ImageMemo:
    """One batch's images as the tower encoded them (`pooler_output` per row), kept for reuse
    while `pixels` is unchanged: the same tensor at the same version, or an equal one."""

    pixels: Tensor
    version: int
    encoded: Any

    @classmethod
    def of(cls, pixels: Tensor, encoded: Any) -> ImageMemo:
        return cls(pixels, pixels._version, encoded)

    def serves(self, pixels: Tensor) -> bool:
        """Whether `pixels` are the batch this memo encoded (an in-place change is not)."""
        if self.pixels._version != self.version:
            return False
        if pixels is self.pixels:
            return True
        same_kind = pixels.shape == self.pixels.shape and pixels.dtype == self.pixels.dtype
        return same_kind and torch.equal(pixels, self.pixels)


def _encode(vlm: Any, pixels: Float[Tensor, "image channel height width"]) -> Any:
    """Each distinct image through the tower once, its output given back to every row."""
    kept, inverse = distinct_rows(pixels)
    repeats = len(kept) < len(pixels)
    encoded = vlm.hf_model.model.get_image_features(pixels[kept] if repeats else pixels, return_dict=True)
    if repeats:
        encoded.pooler_output = encoded.pooler_output[inverse.to(encoded.pooler_output.device)]
    encoded.last_hidden_state = None  # per distinct image; nothing downstream reads it
    return encoded


def encode_images_once(vlm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for the HF forward with each distinct image encoded once, or taken from the
    memo of the last batch when these are its images (unchanged when a hook is on the tower or
    projector). A memo is kept only for an encoding without a graph (a backward through it
    would otherwise be asked twice)."""
    pixels = kwargs.get("pixel_values")
    if pixels is None or _tower_hooked(vlm):
        return kwargs
    memo: ImageMemo | None = vlm.image_memo
    if memo is not None and memo.serves(pixels):
        encoded = memo.encoded
    else:
        encoded = _encode(vlm, pixels)
        vlm.image_memo = None if encoded.pooler_output.requires_grad else ImageMemo.of(pixels, encoded)
    rest = {k: v for k, v in kwargs.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": {"image": encoded}}


def images_once(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn(vlm, ...)` inside `vlm.distinct_images()` (for stages whose batches repeat images)."""

    @functools.wraps(fn)
    def wrapper(vlm: Any, *args: Any, **kwargs: Any) -> T:
        with vlm.distinct_images() if hasattr(vlm, "distinct_images") else nullcontext():
            return fn(vlm, *args, **kwargs)

    return wrapper
