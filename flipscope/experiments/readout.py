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
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from flipscope.model.families import final_norm_gain
from flipscope.model.families.sites import find_language_model
from flipscope.model.hooked import HookedVLM

__all__ = ["alignment_threshold", "answer_alignment", "answer_direction"]


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
def answer_alignment(sae: SAE, vlm: HookedVLM) -> Float[np.ndarray, " d_sae"]:
    """Cosine of each feature's decoder row with `answer_direction`: near ±1 for a feature that
    writes yes (+) or no (−), near 0 for one the readout does not see."""
    w_dec = sae.W_dec.detach().float().cpu()
    rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (rows @ answer_direction(vlm).cpu()).numpy()


@torch.no_grad()
def alignment_threshold(sae: SAE, *, n_directions: int = 1000, level: float = 0.95, seed: int = 0) -> float:
    """The null of `answer_alignment`: the `level` quantile of the largest |cosine| between the
    SAE's decoder rows and a random direction (isotropic in the residual stream). A feature more
    aligned with the answer than the best-aligned feature is with a direction that means nothing
    writes the answer."""
    w_dec = sae.W_dec.detach().float().cpu()
    rows = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    best = []
    for start in range(0, n_directions, 100):
        probes = torch.randn(rows.shape[1], min(100, n_directions - start), generator=generator)
        best.append((rows @ (probes / probes.norm(dim=0, keepdim=True))).abs().amax(0))
    return float(torch.quantile(torch.cat(best), level))
