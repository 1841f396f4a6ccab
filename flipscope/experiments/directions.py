"""SAE-free baselines and descriptive reads beside discovery: the DiffMean direction (mean
Δresidual of flips minus that of controls), the per-layer flip-vs-control AUC of its
cross-validated projection, and each feature's mean activation per question family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.data.questions import Question
from flipscope.experiments.pairs import PairActivations
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.sae.encode import check_features, encode_prompts
from flipscope.sae.load import check_sae
from flipscope.stats import auc_interval, bootstrap

__all__ = ["activation_by_family", "diffmean_direction", "layer_auc_sweep"]


def diffmean_direction(pairs: PairActivations, hook: str) -> Float[Tensor, " d_model"]:
    """Mean Δresidual (paraphrase − original) of flip cases minus that of non-flip controls."""
    delta = pairs.delta(hook)
    flips = torch.from_numpy(pairs.is_flip)
    return delta[flips].mean(0) - delta[~flips].mean(0)


def layer_auc_sweep(
    pairs: PairActivations, hooks: Sequence[str], *, folds: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Per hook, how well Δresidual predicts flip vs control: the AUC of the projection on the
    DiffMean direction fitted on the other folds (k-fold, stratified by a seeded shuffle), with a
    stratified bootstrap interval over cases (`auc_interval`). The AUC is None, not NaN, where a
    class has fewer than two cases: some fold's direction would then have no case of it to fit."""
    labels = pairs.is_flip
    n_flips, n_controls = int(labels.sum()), int((~labels).sum())
    counts = {"n": len(labels), "n_flips": n_flips, "n_controls": n_controls}
    if min(n_flips, n_controls) < 2:
        return [{"hook": hook, "auc": None, "low": None, "high": None, **counts} for hook in hooks]
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for group in (np.flatnonzero(labels), np.flatnonzero(~labels)):
        fold[rng.permutation(group)] = np.arange(len(group)) % folds
    rows = []
    for hook in hooks:
        delta = pairs.delta(hook).double().numpy()
        scores = np.empty(len(labels))
        for k in range(folds):
            train, test = fold != k, fold == k
            direction = delta[train & labels].mean(0) - delta[train & ~labels].mean(0)
            scores[test] = delta[test] @ direction
        est = auc_interval(scores, labels, seed=seed)
        rows.append({"hook": hook, "auc": est.value, "low": est.low, "high": est.high, **counts})
    return rows


@torch.no_grad()
def activation_by_family(
    vlm: VLM,
    sae: Any,
    questions: Sequence[Question],
    features: Sequence[int],
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each feature's mean activation at the last prompt position (with the image), per question
    family: the original wording (`original`) and each paraphrase strategy tag; bootstrap 95%
    CI over prompts. Shows which framing switches a feature on or off.

    Returns:
        One cell per feature × family: `{feature, family, n, value, low, high}`.
    """
    check_features(sae, features)
    check_sae(sae, vlm)
    specs, families = [], []
    for q in questions:
        tags = q.strategies or ("paraphrase",) * len(q.paraphrases)
        for text, family in zip(q.prompts, ("original", *tags), strict=True):
            specs.append(
                PromptSpec(question=text, image=q.image)
                if q.image is not None
                else PromptSpec(question=text, condition="context", context=q.context)
            )
            families.append(family)
    chosen = list(features)
    acts = torch.cat(
        [
            encode_prompts(vlm, sae, specs[i : i + batch_size]).features[:, chosen].float().cpu()
            for i in range(0, len(specs), batch_size)
        ]
    ).numpy()
    labels = np.array(families)
    cells = []
    for k, feature in enumerate(chosen):
        for family in dict.fromkeys(families):
            est = bootstrap(acts[labels == family, k].astype(np.float64), seed=seed)
            cells.append({"feature": int(feature), "family": family, **est.to_dict()})
    return cells
