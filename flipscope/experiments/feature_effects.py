"""What a feature does to the answer, measured: its row written at the answer position, and the
feature switched off where the wordings differ.

The logits panel (`feature_logits`) reads a decoder row through the unembedding alone, to first
order: it skips every layer between the SAE's hook and the final norm. Here the row is written and
the rest of the model runs. At the SAE's hook, on each prompt, the feature's decoder row times its
peak activation a (the largest it reaches on the prompts read) is added at the last prompt
position, where the answer is read, and once subtracted; the yes-minus-no margin moves by Δ₊ and
Δ₋. The **effect** is (Δ₊ − Δ₋) / 2: the part of the move that turns with the write's sign, the
part the direct reading predicts (what does not turn, any pull a write of either sign has, is left
out). It is a bootstrap estimate over prompts.

**The null**: `n_random` directions drawn isotropic in the hook's space, each scaled to the norm
of the feature's write (a‖row‖) and written the same way. A feature moves the answer when its
interval excludes zero and its mean effect is larger in size than every random direction's (the
best of `n_random`, so the null matches a search over that many). A write at the last position
cannot reach earlier positions, so each prompt's earlier positions run once and the last token once
per write (`variant_margins`): 2·K·(1 + n_random) single tokens per prompt for K features.

The **removal** (`removal_effects`) asks what the feature's actual activations do: it is
switched off where two wordings can differ (the question's tokens and the template's tail after
them, the last position among them), x ← x − f(x)·row with the SAE's error term kept, and the
margin's move is read against the same prompts as they are. Its null removes the same amounts
along random directions of the row's norm. Each batch's part before the questions runs once per
film (`question_runs`) and every removal runs on the questions and tails alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.experiments.span_patch import tail_length
from flipscope.interventions.hooks import shift_features_hook
from flipscope.interventions.last_token import subtracted_margins
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.model.suffix import question_runs
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features
from flipscope.stats import bootstrap

__all__ = ["feature_effects", "removal_effects", "write_effects"]


@images_once
@torch.no_grad()
def write_effects(
    vlm: VLM,
    specs: Sequence[PromptSpec],
    hook: str,
    writes: Float[Tensor, "write d"],
    *,
    rows_per_forward: int = 512,
    fast: bool = True,
) -> Float[np.ndarray, "spec write"]:
    """Per prompt and write w: (margin with +w − margin with −w) / 2, w added at `hook`'s last
    position (`subtracted_margins`: each prompt's earlier positions run once; each film through
    the vision tower once)."""
    signed = torch.cat([writes, -writes]).float()  # [2 write, d]: −(−w) adds w, −(w) subtracts it
    vectors = (-signed)[None].expand(len(specs), -1, -1)
    margins = subtracted_margins(vlm, specs, hook, vectors, rows_per_forward, fast=fast)
    return ((margins[:, : len(writes)] - margins[:, len(writes) :]) / 2).double().numpy()


def feature_effects(
    vlm: VLM,
    sae: Any,
    hook: str,
    features: Sequence[int],
    scales: Sequence[float],
    specs: Sequence[PromptSpec],
    *,
    n_random: int = 16,
    seed: int = 0,
    rows_per_forward: int = 512,
    fast: bool = True,
) -> dict[str, Any]:
    """Per feature (its index as a string), the measured effect of writing its decoder row at
    `scales` (its peak activation) at the answer position of each of `specs` (module docstring):
    `scale`, `effect` (bootstrap estimate over prompts of the margin's move), `per_unit` (that
    mean over the scale), `null` (the largest |mean effect| among `n_random` random directions of
    the write's norm), `n_random` and `moves` (interval excludes zero and beyond the null). A
    feature that never fires (scale 0), or whose written margins are not finite, gets `effect`
    None and `why`.

    Raises:
        FlipscopeError: a feature outside the SAE, or not one scale per feature.
    """
    check_features(sae, features)
    if len(scales) != len(features):
        raise FlipscopeError(f"{len(scales)} scales for {len(features)} features: one scale per feature")
    rows = sae.W_dec.detach().float().cpu()[[int(f) for f in features]]  # [feature, d]
    probes = _probes(n_random, rows.shape[1], seed)
    writes = []
    for row, scale in zip(rows, scales, strict=True):
        writes += [row * scale, *(probes * (row.norm() * scale))]
    effects = write_effects(vlm, specs, hook, torch.stack(writes), rows_per_forward=rows_per_forward, fast=fast)
    out = {}
    for j, (f, scale) in enumerate(zip(features, scales, strict=True)):
        block = effects[:, j * (1 + n_random) : (j + 1) * (1 + n_random)]
        out[str(int(f))] = _judged(block[:, 0], block[:, 1:], float(scale), n_random)
    return out


def _judged(effect: np.ndarray, random: np.ndarray, scale: float, n_random: int, scaled: bool = True) -> dict:
    """One feature's effect over prompts, judged against the random directions' (one column each);
    with `scaled`, a write at `scale` (its `scale` and `per_unit` reported)."""
    if scale <= 0 or not np.isfinite(effect).all():
        why = "it never fires on the prompts read" if scale <= 0 else "its margins are not finite numbers"
        out = {"effect": None, "why": why, "null": None, "n_random": n_random, "moves": False}
        return {"scale": scale, "per_unit": None, **out} if scaled else out
    estimate = bootstrap(effect)
    null = float(np.abs(random.mean(0)).max()) if n_random else 0.0
    beyond = abs(estimate.value) > null and (estimate.low > 0 or estimate.high < 0)
    out = {"effect": estimate.to_dict(), "null": null, "n_random": n_random, "moves": bool(beyond)}
    return {"scale": scale, "per_unit": estimate.value / scale, **out} if scaled else out


def _probes(n: int, width: int, seed: int) -> Float[Tensor, "n d"]:
    """`n` unit directions drawn isotropic in `width` dimensions (seeded)."""
    probes = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    return probes / probes.norm(dim=1, keepdim=True)


@images_once
@torch.no_grad()
def removal_effects(
    vlm: VLM,
    sae: Any,
    hook: str,
    features: Sequence[int],
    specs: Sequence[PromptSpec],
    *,
    n_random: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    fast: bool = True,
) -> dict[str, Any]:
    """Per feature (its index as a string), the margin's move when it is switched off on each of
    `specs`' questions and tails (module docstring): `effect` (bootstrap estimate over prompts of
    removed minus as-is), `null` (the largest |mean move| among `n_random` random directions of
    its row's norm removed in the same amounts), `n_random` and `moves` (interval excludes zero
    and beyond the null).

    Raises:
        FlipscopeError: a feature outside the SAE.
    """
    check_features(sae, features)
    chosen = [int(f) for f in features]
    rows = sae.W_dec.detach().float()[chosen]
    probes = _probes(n_random, rows.shape[1], seed).to(rows)
    moved = np.zeros((len(specs), len(chosen), 1 + n_random))
    for start in range(0, len(specs), batch_size):
        chunk = list(specs[start : start + batch_size])
        runs = question_runs(vlm, chunk, [hook], fast=fast)
        inputs = runs.inputs
        where = vlm.prompts.question_mask(chunk, inputs)
        where[:, inputs.input_ids.shape[1] - tail_length(vlm) :] = True
        mask, base = runs.to_run(where), runs.margins()
        for j, (f, row) in enumerate(zip(chosen, rows, strict=True)):
            for r, direction in enumerate([row, *(probes * row.norm())]):
                edit = shift_features_hook(sae, [f], torch.zeros(1), mask, directions=direction[None])
                moved[start : start + len(chunk), j, r] = (runs.margins([(hook, edit)]) - base).double().cpu().numpy()
    return {str(f): _judged(moved[:, j, 0], moved[:, j, 1:], 1.0, n_random, scaled=False) for j, f in enumerate(chosen)}
