"""Margins of several edits at each prompt's last position, its earlier positions run once.

An edit at the last position cannot reach earlier positions, so where the family's KV-cache path
is sound each prompt runs once up to its last token and the last token once per variant of the
edit on that cache (`VLM.score_last_token`; equal to full forwards within 1e-5, tested). At
MedGemma's 896-px images a prompt is ~300 tokens, so k variants cost one prompt forward and k
single tokens instead of k prompt forwards. Where the path is unsound (`fast_path_off`), every
variant is a full forward. Patching (`patch_bank` with its two controls), rank-1 patching and the
patching sweeps all score through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.interventions.hooks import subtract_at_last
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM

__all__ = ["subtracted_margins", "variant_margins"]


@torch.no_grad()
def variant_margins(
    vlm: VLM, specs: Sequence[PromptSpec], n_variants: int, fwd_hooks: Sequence = (), *, fast: bool = True
) -> Float[Tensor, "spec variant"]:
    """Margins of `n_variants` copies of each prompt that differ only in what `fwd_hooks` do at
    the last position (the hooks see spec-major rows); on the last-token path when `fast` and the
    family allows it, else as full forwards of the repeated prompts."""
    if fast and getattr(vlm, "fast_path_off", None) is None:
        return vlm.score_last_token(list(specs), n_variants, fwd_hooks)
    rows = [spec for spec in specs for _ in range(n_variants)]
    with vlm.hooks(fwd_hooks=list(fwd_hooks)):
        return vlm.score(vlm.prompts.build(rows)).reshape(len(specs), n_variants)


@torch.no_grad()
def subtracted_margins(
    vlm: VLM,
    specs: Sequence[PromptSpec],
    hook: str,
    vectors: Float[Tensor, "spec variant d_model"],
    rows_per_forward: int,
    *,
    fast: bool = True,
    progress: bool = False,
    desc: str = "patching",
) -> Float[Tensor, "spec variant"]:
    """Margin of each prompt with each of its variant vectors subtracted at `hook`, last position,
    in chunks of at most `rows_per_forward` prompt × variant rows (the key/value cache of a chunk
    is repeated once per variant, so this bounds memory as a batch size does). Where one prompt has
    more variants than that, they run in slices of `rows_per_forward`, its prefix once per slice."""
    n_variants = vectors.shape[1]
    if n_variants > rows_per_forward:
        slices = [vectors[:, k : k + rows_per_forward] for k in range(0, n_variants, rows_per_forward)]
        return torch.cat([subtracted_margins(vlm, specs, hook, v, rows_per_forward, fast=fast, progress=progress,
                                             desc=desc) for v in slices], dim=1)  # fmt: skip
    per_chunk = max(1, rows_per_forward // n_variants)
    out = []
    for start in tqdm(range(0, len(specs), per_chunk), desc=desc, disable=not progress):
        flat = vectors[start : start + per_chunk].reshape(-1, vectors.shape[-1])  # spec-major rows
        chunk = specs[start : start + per_chunk]
        out.append(variant_margins(vlm, chunk, n_variants, [(hook, subtract_at_last(flat))], fast=fast))
    return torch.cat(out)
