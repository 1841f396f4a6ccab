"""Edited models: siblings of a `HookedVLM` that share its weights and apply a fixed edit on
every forward (prefill and each decoding step, on every scoring path).

**Clamping** (`ClampedVLM`): at the SAE's hook, at every position, x ← x − (f(x) − value) · W_dec[f]
for each clamped feature f: the feature's own contribution is replaced by `value` (0 switches it
off) and everything else, the SAE error term included, stays. **Direction ablation**
(`DirectionAblatedVLM`): x ← x − (x · û) û at every position, the SAE-free baseline a feature has
to beat (e.g. û the DiffMean direction of flips vs controls). **Head ablation**
(`HeadAblatedVLM`): attention heads' outputs replaced by their means (or zeros) at every position,
switching off a head the trace names.

Both are `HookedVLM`s (made as `HookedVLM.edited` makes siblings), so every stage takes them in
place of the model; the edit fires exactly once per forward however hooks and contexts nest, and
its description goes into `identity()`, so a store written under one edit never resumes under
another.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.interventions.hooks import ablate_direction_hook, ablate_heads_hook, clamp_hook
from flipscope.model.hook_names import attention_heads, attn_z
from flipscope.model.hooked import Edit, HookedVLM
from flipscope.sae.encode import check_features
from flipscope.sae.load import check_sae

__all__ = ["ClampedVLM", "DirectionAblatedVLM", "EditedVLM", "HeadAblatedVLM", "InterventionVLM", "clamp"]


class EditedVLM(HookedVLM):
    """`model` (a `HookedVLM`, possibly already edited) with one more `edit` on every forward.

    Attributes:
        model: The model it was made from (unchanged; it shares the weights).
        description: The edit's description (also in `identity()`).

    Raises:
        FlipscopeError: the edit's hook is not one of the model's hook points.
    """

    def __init__(self, model: HookedVLM, edit: Edit) -> None:
        if edit.hook_name not in model.hook_dict:
            raise FlipscopeError(f"hook {edit.hook_name!r} is not a hook point of the model (see `flipscope hooks`)")
        super().__init__(**model.sibling_args(edit))
        self._base = (model,)  # a tuple, so the base is not registered as a child module
        self.description = dict(edit.description)

    @property
    def model(self) -> HookedVLM:
        return self._base[0]

    @property
    def hook_name(self) -> str:
        return self.edits[-1].hook_name


InterventionVLM = EditedVLM  # the 0.1 name


class ClampedVLM(EditedVLM):
    """`model` with SAE features clamped: `ClampedVLM(vlm, sae, {3818: 0.0})`.

    Raises:
        FlipscopeError: a feature is outside the SAE, a value is not finite, or the SAE does not fit the model.
    """

    def __init__(self, model: HookedVLM, sae: Any, values: Mapping[int, float]) -> None:
        check_features(sae, list(values))
        hook_name = check_sae(sae, model)
        values = {int(f): float(v) for f, v in values.items()}
        bad = {f: v for f, v in values.items() if not math.isfinite(v)}
        if bad:
            raise FlipscopeError(f"clamp values {bad} are not finite numbers; a clamp holds a feature at a real value")
        description = {"clamp": {"hook": hook_name, "values": values}}
        super().__init__(model, Edit(hook_name, clamp_hook(sae, values), description))
        self._sae = (sae,)
        self.values = values

    @property
    def sae(self) -> Any:
        return self._sae[0]


class DirectionAblatedVLM(EditedVLM):
    """`model` with `direction` projected out of the residual at `hook_name`, every position.

    Raises:
        FlipscopeError: the direction is not a finite, nonzero vector of the model's width.
    """

    def __init__(
        self, model: HookedVLM, hook_name: str, direction: Float[Tensor, " d_model"], name: str = "direction"
    ) -> None:
        direction = torch.as_tensor(direction).detach().float().cpu()
        if direction.shape != (model.d_model,):
            raise FlipscopeError(
                f"direction has shape {tuple(direction.shape)}; expected ({model.d_model},), the model's d_model"
            )
        if not torch.isfinite(direction).all() or float(direction.norm()) == 0.0:
            raise FlipscopeError("direction must be finite and nonzero")
        digest = hashlib.sha256(direction.numpy().tobytes()).hexdigest()[:16]
        description = {"ablate_direction": {"hook": hook_name, "name": name, "sha256": digest}}
        super().__init__(model, Edit(hook_name, ablate_direction_hook(direction), description))
        self.direction = direction


class HeadAblatedVLM(EditedVLM):
    """`model` with attention heads of one layer switched off at every position: each head's output
    (its slice of `blocks.{layer}.attn.hook_z`) replaced by its mean over a set of prompts (`means`,
    the whole hook's width; `flipscope.experiments.heads.head_means`), or by zeros without one.
    `HeadAblatedVLM(vlm, 0, [0], means)` switches off head 0.0, the head `flipscope trace --heads` names.

    Raises:
        FlipscopeError: the layer or a head is not the model's, or `means` is not a finite vector of
            the hook's width.
    """

    def __init__(
        self, model: HookedVLM, layer: int, heads: Sequence[int], means: Float[Tensor, " width"] | None = None
    ) -> None:
        n_heads, head_dim = attention_heads(model.hf_model)
        if not 0 <= int(layer) < model.n_layers:
            raise FlipscopeError(f"layer {layer}: the model has layers 0..{model.n_layers - 1}")
        bad = [h for h in heads if not 0 <= int(h) < n_heads]
        if bad or not heads:
            raise FlipscopeError(f"heads {bad or '[]'}: each layer has heads 0..{n_heads - 1}")
        description: dict[str, Any] = {"layer": int(layer), "heads": sorted({int(h) for h in heads})}
        if means is not None:
            means = torch.as_tensor(means).detach().float().cpu()
            if means.shape != (n_heads * head_dim,) or not torch.isfinite(means).all():
                raise FlipscopeError(
                    f"means has shape {tuple(means.shape)}; expected ({n_heads * head_dim},), finite: the heads' width"
                )
            description["sha256"] = hashlib.sha256(means.numpy().tobytes()).hexdigest()[:16]
        description["by"] = "zero" if means is None else "mean"
        columns = [slice(h * head_dim, (h + 1) * head_dim) for h in description["heads"]]
        hook = attn_z(int(layer))
        super().__init__(model, Edit(hook, ablate_heads_hook(columns, means), {"ablate_heads": description}))
        self.layer, self.heads, self.means = int(layer), description["heads"], means


@contextmanager
def clamp(model: HookedVLM, sae: Any, values: Mapping[int, float]) -> Iterator[ClampedVLM]:
    """`with clamp(vlm, sae, {f: 0.0}) as clamped:` — the same model, clamped, for a block."""
    yield ClampedVLM(model, sae, values)
