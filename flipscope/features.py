"""Feature discovery over FlipBank pairs: which SAE features track the framing that flips answers.

For every case, Δf = f(paraphrase) − f(original) at the last prompt position of the SAE's layer.
Features are ranked three ways, each with its interval or test and Benjamini–Hochberg q-values
over all features:

- **size**: mean |Δf| over flip cases (bootstrap interval);
- **correlation** of Δf with the margin shift m_para − m_orig over flip cases (Pearson and
  Spearman, Fisher-z intervals) — the default ranking, the paper's r = 0.71 criterion (over flips
  only, so it measures whether a feature tracks how far the answer moved, not merely whether it
  moved);
- **separation** of flips from non-flip controls by Δf (Mann–Whitney U, AUC).

Beside them: **attribution**, gradient × Δactivation of the margin through the SAE features (for
every feature in one backward pass per batch), estimating what removing Δf_i would do to the
margin, so exact patching needs only the top few; the **difference-of-means direction** (mean
Δresidual of flips minus that of controls), a baseline that needs no SAE; and a per-layer
flip-prediction AUC sweep (cross-validated DiffMean projection at every layer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.answers import yes_no_margin
from flipscope.errors import FlipscopeError
from flipscope.pairs import PairActivations, collect_pairs
from flipscope.patching import check_features, decoder_vectors, patched_margins
from flipscope.prompts import PromptSpec
from flipscope.sae import check_sae, encode_prompts, encode_with_error
from flipscope.stats import auc, bh_qvalues, bootstrap, bootstrap_means, correlations, mann_whitney

__all__ = [
    "Discovery",
    "activation_by_family",
    "attribution_scores",
    "diffmean_direction",
    "discover",
    "exact_ablation_effects",
    "feature_table",
    "layer_auc_sweep",
]

RANKINGS = ("pearson", "spearman", "auc", "size", "attribution")


def _direction_sign(pairs: PairActivations) -> Float[Tensor, " case"]:
    """+1 where moving the paraphrase margin up moves it toward the original's."""
    return torch.sign(pairs.margin_orig - pairs.margin_para)


def feature_table(
    delta_f: Float[np.ndarray, "case d_sae"],
    margin_shift: Float[np.ndarray, " case"],
    is_flip: Bool[np.ndarray, " case"],
    *,
    attribution: Float[np.ndarray, " d_sae"] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Any:
    """One row per feature with every discovery statistic, sorted by |Pearson r| (a DataFrame).

    Columns: feature; mean_abs_delta (over flips) with low/high; mean_delta_flip,
    mean_delta_control; pearson_r, pearson_low, pearson_high, pearson_p, pearson_q (Δf against
    the margin shift over flips); the same for spearman_*; auc, mwu_u, mwu_p, mwu_q (flips vs
    controls); attribution (if given); and rank_<criterion> (1 = first) for each criterion.
    """
    import pandas as pd

    flips = delta_f[is_flip]
    if len(flips) == 0 or is_flip.all():
        raise FlipscopeError("discovery needs flip cases and non-flip controls; the FlipBank lacks one of them")
    abs_low, abs_high = bootstrap_means(np.abs(flips), n_boot=n_boot, seed=seed)
    pearson = correlations(flips, margin_shift[is_flip])
    spearman = correlations(flips, margin_shift[is_flip], rank=True)
    mwu = mann_whitney(flips, delta_f[~is_flip])
    table = pd.DataFrame(
        {
            "feature": np.arange(delta_f.shape[1]),
            "mean_abs_delta": np.abs(flips).mean(0),
            "mean_abs_delta_low": abs_low,
            "mean_abs_delta_high": abs_high,
            "mean_delta_flip": flips.mean(0),
            "mean_delta_control": delta_f[~is_flip].mean(0),
            **{f"pearson_{k}": v for k, v in pearson.items()},
            "pearson_q": bh_qvalues(pearson["p"]),
            **{f"spearman_{k}": v for k, v in spearman.items()},
            "spearman_q": bh_qvalues(spearman["p"]),
            "auc": mwu["auc"],
            "mwu_u": mwu["u"],
            "mwu_p": mwu["p"],
            "mwu_q": bh_qvalues(mwu["p"]),
        }
    )
    keys = {
        "pearson": np.abs(table["pearson_r"]),
        "spearman": np.abs(table["spearman_r"]),
        "auc": np.abs(table["auc"] - 0.5),
        "size": table["mean_abs_delta"],
    }
    if attribution is not None:
        table["attribution"] = attribution
        keys["attribution"] = table["attribution"]
    for name, key in keys.items():
        order = np.argsort(-np.asarray(key, dtype=np.float64), kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        table[f"rank_{name}"] = rank
    return table.sort_values("rank_pearson").reset_index(drop=True)


def _splice_leaf(sae: Any, grabbed: dict[str, Tensor]):
    """A hook that re-expresses the last position as decode(f) + error with f a fresh leaf
    tensor (stored in `grabbed`), so the margin can be differentiated by every feature at once."""

    def splice(x: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        enc = encode_with_error(sae, x[:, -1].detach())
        features = enc.features.detach().requires_grad_(True)
        grabbed["features"] = features
        x = x.clone()
        x[:, -1] = sae.decode(features).to(x.dtype) + enc.error.detach()
        return x

    return splice


def attribution_scores(
    vlm: Any,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[np.ndarray, "flip d_sae"]:
    """Per flip case and feature, the linear estimate of how far removing Δf_i moves the
    paraphrase margin toward the original's: grad_f(margin) · (f_orig − f_para) · sign(m_orig − m_para).

    The gradient is taken on the paraphrase run with the SAE spliced in at `hook` (last position,
    error term kept, so the forward is unchanged), with respect to every feature at once.
    """
    n_flips = int(pairs.is_flip.sum())  # flips come first
    para_specs = pairs.paraphrase_specs()[:n_flips]
    f_orig = pairs.features(sae, hook)[0][:n_flips]
    sign = _direction_sign(pairs)[:n_flips]
    out = []
    for start in tqdm(range(0, n_flips, batch_size), desc="attribution", disable=not progress):
        stop = min(start + batch_size, n_flips)
        inputs = vlm.prompts.build(para_specs[start:stop])
        grabbed: dict[str, Tensor] = {}
        with torch.enable_grad(), vlm.hooks(fwd_hooks=[(hook, _splice_leaf(sae, grabbed))]):
            margin = yes_no_margin(vlm.last_logits(inputs), vlm.answer_tokens)
            (grad,) = torch.autograd.grad(margin.sum(), grabbed["features"])
        delta_patch = f_orig[start:stop] - grabbed["features"].detach()
        out.append((grad * delta_patch * sign[start:stop, None].to(grad.dtype)).float())
    return torch.cat(out).numpy()


def exact_ablation_effects(
    vlm: Any,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    features: Sequence[int],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[np.ndarray, "flip n_features"]:
    """Per flip case and feature, the exact margin change toward the original's when that one
    feature's Δf is removed at `hook` (delta-only patch, last position): (m_patched − m_para) ·
    sign(m_orig − m_para)."""
    n_flips = int(pairs.is_flip.sum())  # flips come first
    para_specs = pairs.paraphrase_specs()[:n_flips]
    delta_f = pairs.feature_delta(sae, hook)[:n_flips]
    sign = _direction_sign(pairs)[:n_flips]
    effects = torch.empty(n_flips, len(features))
    jobs = [(k, c) for k in range(len(features)) for c in range(n_flips)]
    for start in tqdm(range(0, len(jobs), batch_size), desc="exact ablation", disable=not progress):
        chunk = jobs[start : start + batch_size]
        cases = [c for _, c in chunk]
        vectors = torch.cat(
            [decoder_vectors(sae, delta_f[c, features[k]].reshape(1, 1), [features[k]]) for k, c in chunk]
        )
        margins = patched_margins(vlm, vlm.prompts.build([para_specs[c] for c in cases]), hook, vectors)
        for (k, c), m in zip(chunk, margins.tolist(), strict=True):
            effects[c, k] = (m - float(pairs.margin_para[c])) * float(sign[c])
    return effects.numpy()


def diffmean_direction(pairs: PairActivations, hook: str) -> Float[Tensor, " d_model"]:
    """Mean Δresidual (paraphrase − original) of flip cases minus that of non-flip controls."""
    delta = pairs.delta(hook)
    flips = torch.from_numpy(pairs.is_flip)
    return delta[flips].mean(0) - delta[~flips].mean(0)


def _auc_of(scores: np.ndarray, labels: np.ndarray):
    """AUC of the cases whose indices are given (for bootstrapping over cases)."""
    return lambda index: auc(scores[index.astype(np.int64)], labels[index.astype(np.int64)])


def layer_auc_sweep(
    pairs: PairActivations, hooks: Sequence[str], *, folds: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Per hook, how well Δresidual predicts flip vs control: the AUC of the projection on the
    DiffMean direction fitted on the other folds (k-fold, stratified by a seeded shuffle), with a
    bootstrap interval over cases."""
    labels = pairs.is_flip
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
        est = bootstrap(np.arange(len(labels), dtype=np.float64), _auc_of(scores, labels), n_boot=500, seed=seed)
        rows.append({"hook": hook, "auc": est.value, "low": est.low, "high": est.high, "n": len(labels)})
    return rows


def _check_attribution(
    vlm: Any,
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
        "n_moving_features": len(moving),
        "attribution": attributed.mean(0).tolist(),
        "exact": exact.mean(0).tolist(),
        "spearman": float(stats.spearmanr(attributed.mean(0), exact.mean(0)).statistic),
        "pearson": float(stats.pearsonr(attributed.mean(0), exact.mean(0)).statistic),
        "spearman_cases": float(stats.spearmanr(attributed.ravel(), exact.ravel()).statistic),
    }


def records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as plain-Python dicts, every float at full precision (pandas' `to_json`
    rounds to 10 decimals, which turns a p-value of 1e-16 into 0); NaN becomes None."""

    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and value != value else value

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


@dataclass
class Discovery:
    """What `discover` found.

    Attributes:
        table: One row per SAE feature (see `feature_table`), sorted by |Pearson r|.
        hook: The SAE's hook.
        layers: The per-layer flip-prediction AUC sweep (`layer_auc_sweep`).
        diffmean: The DiffMean direction at the SAE's hook, and its best-aligned SAE features.
        ablation: Attribution vs exact single-feature ablation on the top attributed features
            (Spearman and Pearson over features, Spearman over case × feature), when computed.
        meta: The bank, model, SAE and settings it came from.
    """

    table: Any
    hook: str
    layers: list[dict[str, Any]]
    diffmean: dict[str, Any]
    ablation: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int = 10, by: str = "pearson") -> Any:
        """The `k` first features by one criterion (`pearson`, `spearman`, `auc`, `size`, `attribution`)."""
        if f"rank_{by}" not in self.table:
            known = [r for r in RANKINGS if f"rank_{r}" in self.table]
            raise FlipscopeError(f"unknown ranking {by!r}; expected one of {known}")
        return self.table.sort_values(f"rank_{by}").head(k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "flipscope-discovery/1",
            "hook": self.hook,
            "meta": self.meta,
            "layers": self.layers,
            "diffmean": self.diffmean,
            "ablation": self.ablation,
            "features": records(self.table),
        }

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the JSON (everything) and a CSV of the feature table beside it; returns both paths."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        csv = path.with_suffix(".csv")
        self.table.to_csv(csv, index=False)
        return path, csv


def discover(
    vlm: Any,
    sae: Any,
    bank: Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    exact_top: int = 50,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> Discovery:
    """Everything above on one FlipBank: pair activations at every layer in `layers` (default all)
    and the SAE's hook, the feature table with attribution, the DiffMean baseline, the layer
    sweep, and (with `exact_top` > 0) exact single-feature ablation of the top attributed
    features to check the attribution ranking. `pairs` reuses activations already collected
    from this bank at those hooks (e.g. to patch the same cases afterwards).

    Raises:
        FlipscopeError: the SAE does not fit the model, the bank was made by another model, the
            bank lacks flips or controls, or `pairs` lacks one of the hooks.
    """
    hook = check_sae(sae, vlm)
    layer_ids = list(range(vlm.n_layers)) if layers is None else list(layers)
    layer_hooks = [f"blocks.{layer}.hook_resid_post" for layer in layer_ids]
    needed = sorted({*layer_hooks, hook})
    if pairs is None:
        pairs = collect_pairs(vlm, bank, needed, batch_size=batch_size, progress=progress)
    missing = [name for name in needed if name not in pairs.orig]
    if missing:
        raise FlipscopeError(f"pairs lack the hooks {missing}; collect them with collect_pairs(vlm, bank, hooks)")
    delta_f = pairs.feature_delta(sae, hook).double().numpy()
    per_case = attribution_scores(vlm, sae, hook, pairs, batch_size=batch_size, progress=progress)
    table = feature_table(
        delta_f,
        pairs.margin_shift.double().numpy(),
        pairs.is_flip,
        attribution=per_case.mean(0),
        n_boot=n_boot,
        seed=seed,
    )
    direction = diffmean_direction(pairs, hook)
    w_dec = sae.W_dec.detach().float()
    cosines = (w_dec / w_dec.norm(dim=1, keepdim=True)) @ (direction / direction.norm())
    best = torch.argsort(cosines, descending=True)[:5]
    diffmean = {
        "direction": direction.tolist(),
        "norm": float(direction.norm()),
        "top_features": [{"feature": int(i), "cosine": float(cosines[i])} for i in best],
    }
    ablation = None
    if exact_top > 0:
        ablation = _check_attribution(vlm, sae, hook, pairs, per_case, delta_f, exact_top, batch_size, progress)
    flips = pairs.is_flip
    meta = {
        "model": vlm.identity(),
        "sae": {"hook": hook, "d_sae": int(sae.cfg.d_sae), "d_in": int(sae.cfg.d_in)},
        "bank": {
            "n_flips": int(flips.sum()),
            "n_controls": int((~flips).sum()),
            "source": dict(bank.get("source", {})),
        },
        "n_boot": n_boot,
        "seed": seed,
        "margin_shift_flips": bootstrap(pairs.margin_shift[flips].double().numpy(), seed=seed).to_dict(),
        "margin_shift_controls": bootstrap(pairs.margin_shift[~flips].double().numpy(), seed=seed).to_dict(),
    }
    layers_auc = layer_auc_sweep(pairs, layer_hooks, seed=seed)
    return Discovery(table=table, hook=hook, layers=layers_auc, diffmean=diffmean, ablation=ablation, meta=meta)


@torch.no_grad()
def activation_by_family(
    vlm: Any,
    sae: Any,
    questions: Sequence[Any],
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
            specs.append(PromptSpec(question=text, image=q.image))
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
