"""Weight-space directional ablation: a direction removed from what chosen layers write to the
residual stream, folded into their weights, so the cured model is an ordinary checkpoint that
runs with no hooks.

At each chosen layer and component (`attn`: `o_proj`, `mlp`: `down_proj`), the writer's output
matrix W becomes (I − ûûᵀ) W (for several directions, such as features' decoder rows, the
projection onto an orthonormal basis of their span). In a Llama-style layer the writer's output is what the residual
receives, so û = r̂ and nothing along r is written. Gemma 3 passes the writer's output y through a
post-norm, g ⊙ y / rms(y) (g = 1 + weight); there û = unit(g ⊙ r): then g ⊙ (I − ûûᵀ) y has no
component along r, so again nothing along r is written, and the norm rescales what remains as it
would anyway. A projection after the norm cannot be folded (it would change the norm's scale), so
the runtime twin of the fold removes û at the writer's output before the norm
(`blocks.{L}.ln1_post.hook_in` / `ln2_post.hook_in`; in a Llama-style layer `hook_attn_out` /
`hook_mlp_out`): `ablate_writers` is that twin, `fold_writers` the fold, equal within float
tolerance (tested on both styles).

The edit is recorded in the checkpoint's config (`flipscope_edit`), which goes into the model's
`identity()`, so a store of the cured model never resumes into the base's.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from flipscope.errors import FlipscopeError
from flipscope.interventions.edited import DirectionAblatedVLM
from flipscope.model.families.sites import find_language_model
from flipscope.model.hooked import HookedVLM

__all__ = ["WRITERS", "WriterSite", "ablate_writers", "edit_description", "fold_writers", "writer_sites"]

WRITERS = {"attn": ("self_attn", "o_proj", "post_attention_layernorm", "ln1_post"),
           "mlp": ("mlp", "down_proj", "post_feedforward_layernorm", "ln2_post")}  # fmt: skip


@dataclass(frozen=True)
class WriterSite:
    """One writer directions are removed from: the runtime hook of its output and an orthonormal
    basis of what is removed there (one row per direction; module docstring)."""

    layer: int
    component: str
    hook: str
    basis: Float[Tensor, "k d_model"]


Directions = Float[Tensor, " d_model"] | Float[Tensor, "k d_model"]


def _gain(norm: nn.Module) -> Tensor:
    """The per-channel gain of an RMSNorm: Gemma's norms multiply by 1 + weight, Llama's by weight."""
    weight = norm.weight.detach().double()
    return 1.0 + weight if type(norm).__name__.startswith("Gemma") else weight


def _check(vlm: HookedVLM, direction: Tensor, layers: Sequence[int], components: Sequence[str]) -> Tensor:
    """`direction` as `[k, d_model]` float64 rows (one direction, or several such as decoder rows)."""
    rows = torch.as_tensor(direction).detach().double().cpu()
    rows = rows[None] if rows.ndim == 1 else rows
    if rows.ndim != 2 or rows.shape[1] != vlm.d_model or not len(rows) or not torch.isfinite(rows).all():
        raise FlipscopeError(f"direction: expected finite vectors of width {vlm.d_model} (the model's), one or a stack")
    if int(torch.linalg.matrix_rank(rows)) < len(rows):
        raise FlipscopeError("direction: the vectors are zero or linearly dependent; give independent directions")
    n_layers = len(find_language_model(vlm.hf_model).layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if not layers or bad:
        raise FlipscopeError(f"layers {list(layers)}: expected one or more of 0..{n_layers - 1}")
    unknown = [c for c in components if c not in WRITERS]
    if not components or unknown:
        raise FlipscopeError(f"components {list(components)}: expected one or more of {sorted(WRITERS)}")
    return rows


def _orthonormal(rows: Tensor) -> Tensor:
    """An orthonormal basis, as rows, of the span of `rows`."""
    q, _ = torch.linalg.qr(rows.T)
    return q.T


def writer_sites(
    vlm: HookedVLM, direction: Directions, layers: Sequence[int], components: Sequence[str] = ("attn",)
) -> list[WriterSite]:
    """Where, and what, each chosen writer's output loses (module docstring).

    Raises:
        FlipscopeError: directions of the wrong width, not finite or dependent, a layer or component the model lacks.
    """
    rows = _check(vlm, direction, layers, components)
    stack = find_language_model(vlm.hf_model).layers
    sites = []
    for layer in layers:
        post_norms = hasattr(stack[layer], "post_feedforward_layernorm")
        for component in components:
            _, _, norm_name, tl_name = WRITERS[component]
            if post_norms:
                norm = getattr(stack[layer], norm_name)
                hook, basis = f"blocks.{layer}.{tl_name}.hook_in", _orthonormal(_gain(norm) * rows)
            else:
                hook, basis = f"blocks.{layer}.hook_{component}_out", _orthonormal(rows)
            sites.append(WriterSite(layer, component, hook, basis.float()))
    return sites


def edit_description(
    direction: Directions, layers: Sequence[int], components: Sequence[str], name: str
) -> dict[str, Any]:
    """What a writer ablation is, for `identity()`: the directions' name and digest, the layers and components."""
    digest = hashlib.sha256(torch.as_tensor(direction).detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return {"name": name, "sha256": digest, "layers": [int(x) for x in layers], "components": list(components)}


def ablate_writers(
    vlm: HookedVLM,
    direction: Directions,
    layers: Sequence[int],
    components: Sequence[str] = ("attn",),
    name: str = "direction",
) -> HookedVLM:
    """The runtime twin of `fold_writers`: `vlm` with the same projection at each writer's output, by hooks."""
    model = vlm
    for site in writer_sites(vlm, direction, layers, components):
        for k, u in enumerate(site.basis):  # orthonormal rows: one projection after another is the span's
            model = DirectionAblatedVLM(model, site.hook, u, name=f"{name}[{k}]@{site.layer}.{site.component}")
    return model


@torch.no_grad()
def fold_writers(
    vlm: HookedVLM,
    direction: Directions,
    layers: Sequence[int],
    components: Sequence[str] = ("attn",),
    name: str = "direction",
) -> HookedVLM:
    """A copy of `vlm` whose chosen writers' weights no longer write along `direction` (one vector,
    or a stack of rows; module docstring); `vlm` is unchanged. Save it with `save_pretrained`
    like any checkpoint.

    Raises:
        FlipscopeError: as `writer_sites`; or `vlm` is already edited at run time or adapted (fold
            into a plain model).
    """
    if vlm.edits or vlm.adapter is not None:
        raise FlipscopeError("fold_writers needs a plain model: it has run-time edits or an adapter")
    sites = writer_sites(vlm, direction, layers, components)
    hf_model = copy.deepcopy(vlm.hf_model)
    stack = find_language_model(hf_model).layers
    for site in sites:
        block, linear = WRITERS[site.component][:2]
        module = getattr(getattr(stack[site.layer], block), linear)
        basis = site.basis.double()
        weight = module.weight.double()
        module.weight.copy_((weight - basis.T @ (basis @ weight)).to(module.weight.dtype))
        if module.bias is not None:
            bias = module.bias.double()
            module.bias.copy_((bias - basis.T @ (basis @ bias)).to(module.bias.dtype))
    previous = getattr(hf_model.config, "flipscope_edit", None) or []
    hf_model.config.flipscope_edit = [*previous, edit_description(direction, layers, components, name)]
    return HookedVLM(hf_model, vlm.processor, name_or_path=vlm.name_or_path, prompts=vlm.prompts)
