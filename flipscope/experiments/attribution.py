"""Attribution: how far removing each feature's Δf would move a flip back, for every feature at
once, and its check against exact single-feature ablation.

Attribution is gradient × Δactivation of the margin through the SAE features, spliced in at the
SAE's hook with the error term kept (the forward is unchanged): one backward pass per batch ranks
every feature, so exact patching needs only the top few. `check_attribution` ablates the top
attributed features exactly and reports the rank agreement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.experiments.pairs import PairActivations, evidence_order
from flipscope.interventions.hooks import splice_features_hook
from flipscope.interventions.last_token import subtracted_margins
from flipscope.model.protocol import VLM
from flipscope.model.suffix import question_runs
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features

__all__ = ["attribution_scores", "check_attribution", "direction_sign", "exact_ablation_effects", "frozen_weights"]


@contextmanager
def frozen_weights(vlm: VLM) -> Iterator[None]:
    """No weight records a graph inside the block: the backward of attribution then starts at
    the spliced-in features, so the vision tower and the layers before the SAE's hook keep no
    activations for it (at MedGemma's 896-px tower, the difference between fitting and not)."""
    module = vlm if isinstance(vlm, torch.nn.Module) else None
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def direction_sign(pairs: PairActivations) -> Float[Tensor, " case"]:
    """+1 where moving the paraphrase margin up moves it toward the original's."""
    return torch.sign(pairs.margin_orig - pairs.margin_para)


@images_once
def attribution_scores(
    vlm: VLM,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    *,
    batch_size: int = 32,
    include_controls: bool = False,
    fast: bool = True,
    progress: bool = True,
) -> Float[np.ndarray, "case d_sae"]:
    """Per flip case (and, with `include_controls`, every control after them) and feature, the
    linear estimate of how far removing Δf_i moves the paraphrase margin toward the original's:
    grad_f(margin) · (f_orig − f_para) · sign(m_orig − m_para).

    The gradient is taken on the paraphrase run with the SAE spliced in at `hook` (last position,
    error term kept, so the forward is unchanged), with respect to every feature at once. A film's
    paraphrases are batched together and each batch runs its prompts before the questions once
    per film, the forward and backward on the questions alone (`question_runs`; whole prompts
    with `fast=False`).
    """
    n_flips = len(pairs.cases) if include_controls else int(pairs.is_flip.sum())  # flips come first
    para_specs = pairs.paraphrase_specs()[:n_flips]
    f_orig = pairs.features(sae, hook)[0][:n_flips]
    sign = direction_sign(pairs)[:n_flips]
    order = evidence_order(para_specs)
    out = torch.empty(n_flips, f_orig.shape[1])
    for start in tqdm(range(0, n_flips, batch_size), desc="attribution", disable=not progress):
        rows = order[start : start + batch_size]
        specs = [para_specs[i] for i in rows]
        runs = question_runs(vlm, specs, [hook], fast=fast)
        grabbed: dict[str, Tensor] = {}
        with frozen_weights(vlm), torch.enable_grad():
            margin = runs.margins([(hook, splice_features_hook(sae, grabbed, runs.last_positions))], grad=True)
            (grad,) = torch.autograd.grad(margin.sum(), grabbed["features"])
        delta_patch = f_orig[rows] - grabbed["features"].detach()
        out[rows] = (grad * delta_patch * sign[rows, None].to(grad.dtype)).float()
    return out.numpy()


@images_once
def exact_ablation_effects(
    vlm: VLM,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    features: Sequence[int],
    *,
    batch_size: int = 32,
    fast: bool = True,
    progress: bool = True,
) -> Float[np.ndarray, "flip n_features"]:
    """Per flip case and feature, the exact margin change toward the original's when that one
    feature's Δf is removed at `hook` (delta-only patch, last position): (m_patched − m_para) ·
    sign(m_orig − m_para). Each flip's prompt runs once up to its last token and the last token
    once per feature (`subtracted_margins`, `batch_size` prompts at a time); with `fast=False`,
    or where the family's key/value-cache path is off, every feature is a full forward. Where a
    feature's Δf is 0 the patch is nothing and its effect exactly 0 (attribution's is too: ties
    that a rank correlation must see as ties, on any machine)."""
    check_features(sae, features)
    n_flips = int(pairs.is_flip.sum())  # flips come first
    w_dec = sae.W_dec.detach()[list(features)]
    delta_f = pairs.feature_delta(sae, hook)[:n_flips, list(features)].to(w_dec.dtype)
    margins = subtracted_margins(
        vlm, pairs.paraphrase_specs()[:n_flips], hook, delta_f[:, :, None] * w_dec,
        rows_per_forward=batch_size * len(features), fast=fast, progress=progress, desc="exact ablation",
    )  # fmt: skip
    effect = (margins.float() - pairs.margin_para[:n_flips, None].float()) * direction_sign(pairs)[:n_flips, None]
    return torch.where(delta_f == 0, 0.0, effect).numpy()  # no patch: 0, not the two paths' rounding


def check_attribution(
    vlm: VLM,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    per_case: Float[np.ndarray, "flip d_sae"],
    delta_f: Float[np.ndarray, "case d_sae"],
    k: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Exact single-feature ablation of the `k` features with the largest |attribution| among
    those whose Δf is non-zero on some flip (a feature that never moves has both effects 0, and
    counting such ties would flatter the agreement); Spearman over features and over cases."""
    moving = np.flatnonzero(np.abs(delta_f[pairs.is_flip]).max(0) > 0)
    mean_attr = per_case.mean(0)
    top = moving[np.argsort(-np.abs(mean_attr[moving]), kind="stable")][:k].tolist()
    exact = exact_ablation_effects(vlm, sae, hook, pairs, top, batch_size=batch_size, progress=progress)
    attributed = per_case[:, top]
    return {
        "features": top,
        "n_cases": int(per_case.shape[0]),
        "n_moving_features": len(moving),
        "attribution": attributed.mean(0).tolist(),
        "exact": exact.mean(0).tolist(),
        "spearman": float(stats.spearmanr(attributed.mean(0), exact.mean(0)).statistic),
        "pearson": float(stats.pearsonr(attributed.mean(0), exact.mean(0)).statistic),
        "spearman_cases": float(stats.spearmanr(attributed.ravel(), exact.ravel()).statistic),
    }
