"""Pure hook functions: each is built from the vectors it applies and returns a new tensor.

They are TransformerLens hook functions `(activation, hook) -> activation`, for
`HookedVLM.hooks(...)`, `run_with_hooks` or an `Edit` of an edited model:

- `subtract_at_last` / `replace_at_last`: delta-only and original-value patches at the last
  prompt position (inputs are left-padded); `replace_where`: values put at any positions
  (corrupting words, restoring a clean run); `replace_head_at`: one attention head's output
  (its slice of `attn.hook_z`) put at given positions (head-level tracing);
- `shift_features_hook`: move SAE features to a target wherever a mask says (clamping, span
  patches): x ← x − (f(x) − target) · W_dec, the error term untouched;
- `ablate_direction_hook`: x ← x − (x · û) û; `ablate_heads_hook`: attention heads' outputs
  replaced by their means (or zeros) at every position;
- `splice_features_hook`: re-express the last position as decode(f) + error with f a leaf
  tensor, so the margin can be differentiated by every feature at once (attribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from flipscope.sae.encode import encode_with_error, feature_encoder

__all__ = [
    "ablate_direction_hook",
    "ablate_heads_hook",
    "clamp_hook",
    "replace_at_last",
    "replace_head_at",
    "replace_where",
    "shift_features_hook",
    "splice_features_hook",
    "subtract_at_last",
]


def subtract_at_last(vectors: Float[Tensor, "batch d_model"]):
    """A hook that subtracts one vector per row at the last position (inputs are left-padded)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, -1] -= vectors.to(x.dtype)
        return x

    return hook


def replace_at_last(values: Float[Tensor, "batch d_model"], rows: Bool[Tensor, " batch"] | None = None):
    """A hook that puts `values` at the last position (of `rows` only, if given)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        x = x.clone()
        keep = slice(None) if rows is None else rows.to(x.device)
        x[keep, -1] = values[keep].to(x.dtype)
        return x

    return hook


def shift_features_hook(
    sae: Any,
    features: Sequence[int],
    target: Float[Tensor, "*target n_features"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    directions: Float[Tensor, "n_features d_model"] | None = None,
):
    """A hook that moves `features` to `target` (broadcast over [batch, pos]) at the positions in
    `mask` (default: every position): x ← x − (f(x) − target) · W_dec, computed from the
    activations as they arrive; with `directions`, those take W_dec's rows' place (a null that
    moves the same amounts along other directions). Clamping and span patching both use it."""
    w_dec = sae.W_dec.detach()[torch.tensor(list(features))] if directions is None else directions
    encode = feature_encoder(sae, features)

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        current = encode(x)
        shift = current - target.to(current)
        if mask is not None:
            shift = shift * mask[..., None].to(current)
        return x - (shift @ w_dec.to(current)).to(x.dtype)

    return hook


def clamp_hook(sae: Any, values: Mapping[int, float]):
    """A hook holding each feature in `values` at its value, at every position."""
    return shift_features_hook(sae, [int(f) for f in values], torch.tensor([float(v) for v in values.values()]))


def ablate_direction_hook(direction: Float[Tensor, " d_model"]):
    """A hook projecting `direction` out of the residual at every position: x ← x − (x · û) û."""
    unit = direction.detach().float() / direction.detach().float().norm()

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        u = unit.to(x.device)
        return x - ((x.float() @ u)[..., None] * u).to(x.dtype)

    return hook


def splice_features_hook(sae: Any, grabbed: dict[str, Tensor], positions: Int[Tensor, " batch"] | None = None):
    """A hook that re-expresses each row's last position (or its `positions`: a suffix run's are
    right-padded) as decode(f) + error with f a fresh leaf tensor (stored in
    `grabbed["features"]`); the forward is unchanged."""

    def splice(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        at = torch.full_like(rows, x.shape[1] - 1) if positions is None else positions.to(x.device)
        enc = encode_with_error(sae, x[rows, at].detach())
        features = enc.features.detach().requires_grad_(True)
        grabbed["features"] = features
        x = x.clone()
        x[rows, at] = sae.decode(features).to(x.dtype) + enc.error.detach()
        return x

    return splice


def replace_where(values: Float[Tensor, "batch pos d_model"], mask: Bool[Tensor, "batch pos"]):
    """A hook that puts `values` wherever `mask` is set (same batch and positions as the run)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        where = mask.to(x.device)
        x = x.clone()
        x[where] = values.to(device=x.device, dtype=x.dtype)[where]
        return x

    return hook


def replace_head_at(values: Float[Tensor, "batch width"], positions: Int[Tensor, " batch"], heads: slice):
    """A hook on `attn.hook_z` that puts `values`' columns `heads` (one head's slice of the
    concatenated head outputs, or several) at each row's `positions`, and leaves the rest."""

    def hook(x: Float[Tensor, "batch pos width"], hook: HookPoint) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        x = x.clone()
        x[rows, positions.to(x.device), heads] = values[:, heads].to(device=x.device, dtype=x.dtype)
        return x

    return hook


def ablate_heads_hook(heads: Sequence[slice], values: Float[Tensor, " width"] | None = None):
    """A hook on `attn.hook_z` that replaces the columns of each of `heads` at every position with
    `values`' (a mean ablation), or with zeros when `values` is None."""

    def hook(x: Float[Tensor, "batch pos width"], hook: HookPoint) -> Tensor:
        x = x.clone()
        for columns in heads:
            x[..., columns] = 0.0 if values is None else values[columns].to(device=x.device, dtype=x.dtype)
        return x

    return hook
