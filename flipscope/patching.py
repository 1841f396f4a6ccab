"""Delta-only patching: remove a feature's contribution at the hooked layer and read the margin.

x_patched = x − Σ_f Δf · W_dec[f] at the last prompt position; the SAE error term is untouched
because only the decoder directions of the chosen features are subtracted. The hook functions
here are pure: they are built with the vectors to subtract and passed to `HookedVLM.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from flipscope.errors import FlipscopeError

__all__ = ["decoder_vectors", "patched_margins", "subtract_at_last"]


def decoder_vectors(
    sae: Any, amounts: Float[Tensor, "batch n_features"], features: Sequence[int]
) -> Float[Tensor, "batch d_model"]:
    """Σ_f amounts[:, f] · W_dec[f]: the residual change of moving `features` by `amounts`.

    Raises:
        FlipscopeError: a feature index is outside the SAE.
    """
    bad = [f for f in features if not 0 <= int(f) < sae.cfg.d_sae]
    if bad:
        raise FlipscopeError(f"feature index {bad[0]} is out of range; the SAE has {sae.cfg.d_sae} features")
    w_dec = sae.W_dec.detach()[list(features)]
    return amounts.to(w_dec.dtype) @ w_dec


def subtract_at_last(vectors: Float[Tensor, "batch d_model"]):
    """A hook that subtracts one vector per row at the last position (inputs are left-padded)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, -1] -= vectors.to(x.dtype)
        return x

    return hook


@torch.no_grad()
def patched_margins(
    vlm: Any, inputs: Any, hook_name: str, vectors: Float[Tensor, "batch d_model"]
) -> Float[Tensor, " batch"]:
    """Margins with `vectors` subtracted at `hook_name`, last position, one per row."""
    with vlm.hooks(fwd_hooks=[(hook_name, subtract_at_last(vectors))]):
        return vlm.score(inputs)
