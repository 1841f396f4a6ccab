"""The vision tower once per distinct image, and once per image across the stages of a run.

A FlipBank's original and paraphrase prompts show the same film, so a batch of pair prompts holds
each image several times, and the stages of one command (patching, its controls, the wording
bound, a sweep) show the same films again; at MedGemma's 896-px SigLIP the tower costs more than
the language model. Inside `HookedVLM.distinct_images()` every forward with pixel values hands HF
the images' tower outputs as `mm_encoder_outputs` (what Gemma 3's forward accepts in place of pixel
values), each image encoded alone, once, and kept in the model's `ImageMemo` under a digest of its
bytes. An image's encoding is then a function of the image alone, not of the batch it first came
in, so a result is the same bits whether the memo served it or the tower ran (and whatever ran
before: a resumed run equals an uninterrupted one).

The memo is keyed to the tower's state (each weight's identity, storage and version), so a weight
changed in place or a module swapped empties it; it is used only while no hook reads or edits the
tower or the projector (those hooks must see every row) or while the pixels require grad, keeps
encodings without their graph (a served one carries none to the tower's weights: differentiate
through the tower outside the block), and holds at most `max_bytes` (least recently used out
first). The block is off by default, so a plain forward stays bit-identical to HF's; margins under
it match to float rounding (tested).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import numpy as np
import torch
import xxhash
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = [
    "MEMO_BYTES",
    "ImageMemo",
    "distinct_images_of",
    "distinct_rows",
    "encode_images_once",
    "image_digest",
    "images_once",
    "pixel_bytes",
    "share_image_memo",
]

T = TypeVar("T")
MEMO_BYTES = 1 << 30  # ~400 MedGemma films in bfloat16 (256 soft tokens × 2,560 each), ~200 in float32
TOWER_PARTS = ("vision_tower", "multi_modal_projector")


def distinct_rows(pixels: Float[Tensor, "image channel height width"]) -> tuple[list[int], Int[Tensor, " image"]]:
    """The first row of each distinct image (by `image_digest`) and, per row, the index of its
    image among those."""
    return _first_of_each([image_digest(image) for image in pixels])


def _first_of_each(keys: list[Hashable]) -> tuple[list[int], Int[Tensor, " image"]]:
    first: dict[Hashable, int] = {}
    kept: list[int] = []
    inverse = torch.empty(len(keys), dtype=torch.long)
    for row, key in enumerate(keys):
        if key not in first:
            first[key] = len(kept)
            kept.append(row)
        inverse[row] = first[key]
    return kept, inverse


def pixel_bytes(image: Tensor) -> np.ndarray:
    """An image's pixel values as the bytes `image_digest` hashes (copied to the CPU if need be)."""
    return image.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()


def image_digest(image: Float[Tensor, "channel height width"]) -> Hashable:
    """What identifies one image's pixel values: shape, dtype and the XXH3-128 digest of their bytes.

    A non-cryptographic 128-bit hash: two different films meet by chance with probability ~2^-128
    a pair, and it costs 0.15 ms on an 896-px film against SHA-256's 5.3 ms
    (`benchmarks/bench_digest.py`), which matters where the tower itself takes milliseconds (a GPU).
    It is not a defence against films crafted to collide."""
    return tuple(image.shape), str(image.dtype), xxhash.xxh3_128_digest(pixel_bytes(image))


class ImageMemo:
    """Tower outputs (`pooler_output`, one image's soft tokens) by `image_digest`, for one tower state.

    Attributes:
        max_bytes: The most the memo holds; 0 keeps nothing (the tower then runs on every image).
        encoded: Images the tower has run on, through `encode_images_once`.
        served: Images served from the memo instead.
    """

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes, self.encoded, self.served, self.nbytes = max_bytes, 0, 0, 0
        self._rows: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._tower: Hashable = None
        self._same: dict[Hashable, Hashable] = {}  # a tower state → an equal-valued one it is served as

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Let go of every encoding."""
        self._rows.clear()
        self.nbytes = 0

    def alias(self, state: Hashable, same_as: Hashable) -> None:
        """Serve tower state `state` as `same_as`: another model's tower holding the same weights."""
        self._same[state] = same_as

    def for_tower(self, state: Hashable) -> ImageMemo:
        """This memo, emptied first if the tower's state is not the one its encodings came from."""
        state = self._same.get(state, state)
        if state != self._tower:
            self.clear()
            self._tower = state
        return self

    def get(self, key: Hashable) -> Tensor | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: Hashable, row: Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self.max_bytes or key in self._rows:
            return
        self._rows[key] = row
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._rows.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()


def _tower_modules(hf_model: nn.Module) -> list[nn.Module]:
    base = getattr(hf_model, "model", hf_model)
    return [part for name in TOWER_PARTS if isinstance(part := getattr(base, name, None), nn.Module)]


def _tower_state(modules: list[nn.Module]) -> Hashable:
    """Each tower weight's identity, storage, version, dtype and device: changes when a weight does."""
    return tuple(
        (id(t), t.data_ptr(), t._version, t.dtype, t.device)
        for module in modules
        for t in (*module.parameters(), *module.buffers())
    )


def _tower_hooked(vlm: Any) -> bool:
    return any(
        point.fwd_hooks or point.bwd_hooks
        for name, point in vlm.hook_dict.items()
        if name.startswith(("vision.", "projector."))
    )


def _encode(vlm: Any, pixels: Float[Tensor, "image channel height width"], *, memo: bool) -> Any:
    """Each row's tower output, every distinct image encoded alone once (or, with `memo`, served
    by the model's `ImageMemo` and kept there)."""
    store: ImageMemo = vlm.image_memo
    keys = [image_digest(image) for image in pixels]
    kept, inverse = _first_of_each(keys)
    rows: list[Tensor] = []
    for index in kept:
        key = keys[index]
        row = store.get(key) if memo else None
        if row is None:
            row = vlm.hf_model.model.get_image_features(pixels[index : index + 1], return_dict=True).pooler_output[0]
            store.encoded += 1
            if memo:
                store.put(key, row.detach())
        else:
            store.served += 1
        rows.append(row)
    return BaseModelOutputWithPooling(pooler_output=torch.stack(rows)[inverse.to(rows[0].device)])


def encode_images_once(vlm: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for the HF forward with each distinct image encoded once, or served from the
    model's `ImageMemo` (unchanged when a hook is on the tower or projector). Pixels that require
    grad bypass the memo; a served encoding carries no graph to the tower's weights."""
    pixels = kwargs.get("pixel_values")
    if pixels is None or _tower_hooked(vlm):
        return kwargs
    modules = _tower_modules(vlm.hf_model)
    memo = bool(modules) and not pixels.requires_grad
    if memo:
        vlm.image_memo.for_tower(_tower_state(modules))
    rest = {k: v for k, v in kwargs.items() if k != "pixel_values"}
    return {**rest, "mm_encoder_outputs": {"image": _encode(vlm, pixels, memo=memo)}}


def _weights(modules: list[nn.Module]) -> list[tuple[str, Tensor]]:
    return [(name, t) for module in modules for name, t in (*module.named_parameters(), *module.named_buffers())]


def share_image_memo(base: Any, other: Any) -> bool:
    """Let `other` (a separately loaded model, e.g. a cure of `base`) use `base`'s image memo when
    its vision tower and projector hold the same weights (names, shapes, dtypes, devices and
    values), so each film is encoded once for both: the encodings are then the same bits. A later
    in-place change to either tower changes its state, and the memo empties as for any change.
    Returns whether they share it."""
    if getattr(other, "image_memo", None) is getattr(base, "image_memo", None):
        return hasattr(base, "image_memo")
    if not (hasattr(base, "hf_model") and hasattr(other, "hf_model")):
        return False
    mine, theirs = _tower_modules(base.hf_model), _tower_modules(other.hf_model)
    a, b = _weights(mine), _weights(theirs)
    same = (
        bool(a)
        and len(a) == len(b)
        and all(
            n == m and x.dtype == y.dtype and x.device == y.device and x.shape == y.shape and torch.equal(x, y)
            for (n, x), (m, y) in zip(a, b, strict=True)
        )
    )
    if same:
        base.image_memo.alias(_tower_state(theirs), _tower_state(mine))
        other.image_memo = base.image_memo
    return same


def distinct_images_of(vlm: Any) -> AbstractContextManager[Any]:
    """`vlm.distinct_images()`, or no block for a model without one (an adapter)."""
    return vlm.distinct_images() if hasattr(vlm, "distinct_images") else nullcontext()


def images_once(fn: Callable[..., T]) -> Callable[..., T]:
    """Run `fn(vlm, ...)` inside `vlm.distinct_images()` (for stages whose batches repeat images)."""

    @functools.wraps(fn)
    def wrapper(vlm: Any, *args: Any, **kwargs: Any) -> T:
        with distinct_images_of(vlm):
            return fn(vlm, *args, **kwargs)

    return wrapper
