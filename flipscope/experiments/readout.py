"""The answer readout: the residual direction that moves the yes-minus-no margin, and how far each
SAE feature's decoder row points along it.

Every flip moves the readout, so any statistic that tracks the margin shift also finds features
that merely *write the answer*. Telling those apart from features that carry the framing starts
here: a feature whose decoder row is aligned with the answer direction is a readout candidate
whatever the wording did.

The direction is the logit lens of the margin. Gemma's final RMSNorm scales x / rms(x) by
(1 + w) before the unembedding, so a small change δ of the last residual stream moves the margin
by about ((1 + w) ⊙ (ū_yes − ū_no)) · δ / rms(x), with ū_yes (ū_no) the mean unembedding row of
the yes (no) spellings. Layers between a feature's hook and the final norm are ignored, so the
alignment is a first-order reading, and exact for features written into the last layer.

An SAE on the heads' outputs (`attn.hook_z`, GemmaScope 2's attention SAEs) does not write the
residual stream directly: its rows go through the attention output projection and, in Gemma's
layers, the post-attention norm before they are added. `residual_rows` maps them there through the
projection and the norm's gain, leaving out its 1/rms and its projection off the activation (first
order again), so such an SAE is read the same way. At MedGemma's shapes the map of a 16k-feature
SAE is ~86 GFLOP, so a caller that needs both the alignment and its null maps once (`rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.families import final_norm_gain
from flipscope.model.families.sites import find_language_model
from flipscope.model.hooked import HookedVLM

__all__ = ["alignment_threshold", "answer_alignment", "answer_direction", "residual_rows"]


@torch.no_grad()
def answer_direction(vlm: HookedVLM) -> Float[Tensor, " d_model"]:
    """Unit vector in the residual stream (the final norm's input) that raises the yes-minus-no
    margin fastest, to first order (see the module docstring)."""
    tokens = vlm.answer_tokens
    w_u = vlm.hf_model.get_output_embeddings().weight.detach().float()
    readout = w_u[list(tokens.yes_ids)].mean(0) - w_u[list(tokens.no_ids)].mean(0)
    gain = final_norm_gain(find_language_model(vlm.hf_model).norm)
    direction = gain * readout
    return direction / direction.norm()


@torch.no_grad()
def residual_rows(
    sae: SAE, vlm: HookedVLM | None = None, hook: str | None = None, features: Sequence[int] | None = None
) -> Float[Tensor, "d_sae d_model"]:
    """The SAE's decoder rows (those of `features`, default all) as the directions they add to the
    residual stream: the rows, or for an SAE at `hook` = `blocks.L.attn.hook_z` each row through
    layer L's attention output projection and, where the layer norms attention's output before
    adding it (Gemma), that norm's gain.

    Raises:
        FlipscopeError: an attention SAE's rows asked for without the model they feed.
    """
    rows = sae.W_dec.detach()
    rows = (rows if features is None else rows[list(features)]).float().cpu()
    if hook is None or not hook.endswith(".attn.hook_z"):
        return rows
    if vlm is None:
        raise FlipscopeError(f"an SAE at {hook} writes the residual stream through the model's output projection")
    layer = find_language_model(vlm.hf_model).layers[int(hook.split(".")[1])]
    rows = rows @ layer.self_attn.o_proj.weight.detach().float().cpu().T
    if hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
        rows = rows * final_norm_gain(layer.post_attention_layernorm).cpu()
    return rows


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def answer_alignment(
    sae: SAE, vlm: HookedVLM, hook: str | None = None, *, rows: Tensor | None = None
) -> Float[np.ndarray, " d_sae"]:
    """Cosine of each feature's residual write (`residual_rows`, for an SAE at `hook`, or `rows`
    where the caller has them) with `answer_direction`: near ±1 for a feature that writes yes (+)
    or no (−), near 0 for one the readout does not see."""
    rows = residual_rows(sae, vlm, hook) if rows is None else rows
    return (_unit(rows) @ answer_direction(vlm).cpu()).numpy()


@torch.no_grad()
def alignment_threshold(
    sae: SAE,
    *,
    vlm: HookedVLM | None = None,
    hook: str | None = None,
    rows: Tensor | None = None,
    n_directions: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> float:
    """The null of `answer_alignment`: the `level` quantile of the largest |cosine| between the
    SAE's residual writes (`residual_rows`, or `rows`) and a random direction (isotropic in the
    residual stream). A feature more aligned with the answer than the best-aligned feature is with
    a direction that means nothing writes the answer."""
    rows = _unit(residual_rows(sae, vlm, hook) if rows is None else rows)
    generator = torch.Generator().manual_seed(seed)
    best = []
    for start in range(0, n_directions, 100):
        probes = torch.randn(rows.shape[1], min(100, n_directions - start), generator=generator)
        best.append((rows @ (probes / probes.norm(dim=0, keepdim=True))).abs().amax(0))
    return float(torch.quantile(torch.cat(best), level))
