"""What a feature writes, read straight through the unembedding: the tokens its decoder row raises
and lowers most, and how far it points at the answer.

A dashboard's "logits" panel (SAELens, Neuronpedia): feature f's decoder row, scaled by the final
norm's gain, times every unembedding row gives the logit it adds per unit of activation on the
direct path, before the final norm's 1/rms and ignoring every layer between its hook and the norm.
So the reading is first order, exact only for a feature written into the last layer; at an early
site what the feature writes passes through later layers first. The answer alignment
(`flipscope.experiments.readout`) is the cosine of the same row with the yes-minus-no direction,
judged against the best alignment a random direction reaches with any of the SAE's rows. An SAE
on the heads' outputs (`attn.hook_z`) is read through the attention output projection
(`readout.residual_rows`).

The unembedding is read in blocks of rows, never whole: at MedGemma's 262,208-token vocabulary it
is 2.7 GB in float32, and a block of 16,384 rows is 168 MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.experiments.readout import alignment_threshold, answer_alignment, residual_rows
from flipscope.model.families import final_norm_gain
from flipscope.model.families.sites import find_language_model

__all__ = ["direct_logits", "feature_writes"]


@torch.no_grad()
def direct_logits(
    vlm: Any, sae: Any, features: Sequence[int], k: int, hook: str | None = None, block: int = 16_384
) -> tuple[Float[Tensor, "feature k"], Tensor, Float[Tensor, "feature k"], Tensor]:
    """For each of `features`, the `k` largest and `k` smallest direct logits of its residual write
    (`readout.residual_rows`, for an SAE at `hook`) over the vocabulary (values, token ids; largest
    first, smallest first), the unembedding read `block` rows at a time."""
    w_u = vlm.hf_model.get_output_embeddings().weight
    gain = final_norm_gain(find_language_model(vlm.hf_model).norm).to(w_u.device)
    rows = residual_rows(sae, vlm, hook, features).to(w_u.device) * gain  # [feature, d_model]
    k = min(k, w_u.shape[0])
    top = bottom = (rows.new_zeros((len(rows), 0)), torch.zeros((len(rows), 0), dtype=torch.long))
    for start in range(0, w_u.shape[0], block):
        logits = rows @ w_u[start : start + block].detach().float().T  # [feature, block]
        top = _merge(top, logits, start, k, largest=True)
        bottom = _merge(bottom, logits, start, k, largest=False)
    return top[0].cpu(), top[1].cpu(), bottom[0].cpu(), bottom[1].cpu()


def _merge(kept: tuple[Tensor, Tensor], logits: Tensor, start: int, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k extreme values (and their token ids) among those `kept` and a block of `logits` whose
    first column is token `start`."""
    values, ids = logits.topk(min(k, logits.shape[1]), dim=1, largest=largest)
    values, ids = torch.cat([kept[0], values], 1), torch.cat([kept[1].to(ids.device), ids + start], 1)
    best = values.topk(min(k, values.shape[1]), dim=1, largest=largest).indices
    return values.gather(1, best), ids.gather(1, best)


def feature_writes(vlm: Any, sae: Any, features: Sequence[int], k: int = 10, hook: str | None = None) -> dict[str, Any]:
    """Per feature (its index as a string): `raises` and `lowers` ([token, direct logit] for the k
    tokens it raises and lowers most), its `answer_alignment`, and the random-direction `null`
    that alignment is judged against (the SAE's, the same for every feature); for an SAE at `hook`."""
    decode = vlm.prompts.tokenizer.decode
    up, up_ids, down, down_ids = direct_logits(vlm, sae, features, k, hook)
    rows = residual_rows(sae, vlm, hook)
    alignment, null = answer_alignment(sae, vlm, rows=rows), alignment_threshold(sae, rows=rows)
    return {
        str(int(f)): {
            "raises": [[decode([int(i)]), float(v)] for v, i in zip(up[j], up_ids[j], strict=True)],
            "lowers": [[decode([int(i)]), float(v)] for v, i in zip(down[j], down_ids[j], strict=True)],
            "answer_alignment": float(alignment[int(f)]),
            "null": null,
        }
        for j, f in enumerate(features)
    }
