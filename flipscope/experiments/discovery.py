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

from flipscope.errors import FlipscopeError
from flipscope.experiments.attribution import attribution_scores, check_attribution
from flipscope.experiments.directions import diffmean_direction, layer_auc_sweep
from flipscope.experiments.pairs import PairActivations, collect_pairs
from flipscope.model.hook_names import resid_post
from flipscope.model.protocol import VLM
from flipscope.sae.load import check_sae
from flipscope.stats import bh_qvalues, bootstrap, bootstrap_means, correlations, mann_whitney

__all__ = ["Discovery", "discover", "feature_table", "records"]

RANKINGS = ("pearson", "spearman", "auc", "size", "attribution")


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


def _diffmean_summary(sae: Any, pairs: PairActivations, hook: str) -> dict[str, Any]:
    """The DiffMean direction at `hook` and the five SAE decoder rows closest to it (cosine)."""
    direction = diffmean_direction(pairs, hook)
    w_dec = sae.W_dec.detach().float()
    cosines = (w_dec / w_dec.norm(dim=1, keepdim=True)) @ (direction / direction.norm())
    best = torch.argsort(cosines, descending=True)[:5]
    return {
        "direction": direction.tolist(),
        "norm": float(direction.norm()),
        "top_features": [{"feature": int(i), "cosine": float(cosines[i])} for i in best],
    }


def _meta(vlm: VLM, sae: Any, bank: Mapping[str, Any], hook: str, pairs: PairActivations, n_boot: int, seed: int):
    flips = pairs.is_flip
    return {
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


def discover(
    vlm: VLM,
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
    layer_hooks = [resid_post(layer) for layer in layer_ids]
    needed = sorted({*layer_hooks, hook})
    if pairs is None:
        pairs = collect_pairs(vlm, bank, needed, batch_size=batch_size, progress=progress)
    missing = [name for name in needed if name not in pairs.orig]
    if missing:
        raise FlipscopeError(f"pairs lack the hooks {missing}; collect them with collect_pairs(vlm, bank, hooks)")
    delta_f = pairs.feature_delta(sae, hook).double().numpy()
    per_case = attribution_scores(vlm, sae, hook, pairs, batch_size=batch_size, progress=progress)
    shift = pairs.margin_shift.double().numpy()
    table = feature_table(delta_f, shift, pairs.is_flip, attribution=per_case.mean(0), n_boot=n_boot, seed=seed)
    diffmean = _diffmean_summary(sae, pairs, hook)
    ablation = None
    if exact_top > 0:
        ablation = check_attribution(vlm, sae, hook, pairs, per_case, delta_f, exact_top, batch_size, progress)
    meta = _meta(vlm, sae, bank, hook, pairs, n_boot, seed)
    layers_auc = layer_auc_sweep(pairs, layer_hooks, seed=seed)
    return Discovery(table=table, hook=hook, layers=layers_auc, diffmean=diffmean, ablation=ablation, meta=meta)
