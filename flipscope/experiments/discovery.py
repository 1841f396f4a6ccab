"""Feature discovery over FlipBank pairs: which SAE features carry the framing that flips answers.

For every case, Δf = f(paraphrase) − f(original) at the last prompt position of the SAE's layer.
With family-matched controls (the default curation), the **framing analysis**
(`flipscope.experiments.framing`) labels every feature `framing`, `framing + readout`, `answer
readout` or `none` against nulls that keep the answer structure, ranks the features that carry
the wording first (the default ranking) and states the verdict. Beside it, the paper's statistics,
each with its interval or test, Benjamini–Hochberg q-values over all features and a family-wise p
under the flip/control swap null (`*_p_null`):

- **size**: mean |Δf| over flip cases (bootstrap interval);
- **correlation** of Δf with the margin shift m_para − m_orig over flip cases (Pearson and
  Spearman, Fisher-z intervals), the paper's r = 0.71 criterion;
- **separation** of flips from non-flip controls by Δf (Mann–Whitney U, AUC);
- **attribution**, gradient × Δactivation of the margin through the SAE features (for every
  feature in one backward pass per batch), estimating what removing Δf_i would do to the margin,
  so exact patching needs only the top few.

Every flip moves the answer readout, so these find readout features in any model that flips;
their nulls and the labels say so. Also: the **difference-of-means direction** (mean Δresidual of
flips minus that of controls), a baseline that needs no SAE, and a per-layer flip-prediction AUC
sweep (cross-validated DiffMean projection at every layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float

from flipscope.data.atomic import write_atomic, write_json
from flipscope.errors import FlipscopeError
from flipscope.experiments.attribution import attribution_scores, check_attribution
from flipscope.experiments.directions import diffmean_direction, layer_auc_sweep
from flipscope.experiments.framing import FramingAnalysis, framing_analysis
from flipscope.experiments.pairs import PairActivations, collect_pairs
from flipscope.experiments.readout import alignment_threshold, answer_alignment, residual_rows
from flipscope.model.hook_names import resid_post
from flipscope.model.protocol import VLM
from flipscope.sae.load import check_sae, sae_digest
from flipscope.stats import bh_qvalues, bootstrap, bootstrap_means, correlations, mann_whitney

__all__ = ["Discovery", "discover", "feature_table", "load_discovery", "records"]

RANKINGS = ("framing", "pearson", "spearman", "auc", "size", "attribution")


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
        framing: The framing analysis (`FramingAnalysis.to_dict()`): the flip–control pairs, the
            nulls' thresholds, whether a mechanism is claimed, and the verdict.
    """

    table: Any
    hook: str
    layers: list[dict[str, Any]]
    diffmean: dict[str, Any]
    ablation: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    framing: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """The sentence the numbers support about a framing mechanism."""
        return self.framing.get("verdict", "No framing analysis was run.")

    @property
    def found(self) -> bool:
        """Whether a framing mechanism is claimed (see `flipscope.experiments.framing`)."""
        return bool(self.framing.get("found", False))

    def framing_features(self, k: int | None = None) -> list[int]:
        """Features whose shift on family-matched non-flips beats the null, most framing-specific
        first (empty when none does, or the bank has no such controls)."""
        if "label" not in self.table:
            return []
        carries = self.table[self.table["label"].isin(["framing", "framing + readout"])]
        return [int(f) for f in carries.sort_values("rank_framing")["feature"]][:k]

    def top(self, k: int = 10, by: str | None = None) -> Any:
        """The `k` first features by one criterion (`framing` where the bank has family-matched
        controls, else `pearson`; or `spearman`, `auc`, `size`, `attribution`)."""
        by = by or ("framing" if "rank_framing" in self.table else "pearson")
        if f"rank_{by}" not in self.table:
            known = [r for r in RANKINGS if f"rank_{r}" in self.table]
            raise FlipscopeError(f"unknown ranking {by!r}; expected one of {known}")
        return self.table.sort_values(f"rank_{by}").head(k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "flipscope-discovery/2",
            "hook": self.hook,
            "meta": self.meta,
            "layers": self.layers,
            "diffmean": self.diffmean,
            "ablation": self.ablation,
            "framing": self.framing,
            "features": records(self.table),
        }

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write the JSON (everything) and a CSV of the feature table beside it; returns both paths."""
        path = Path(path)
        write_json(path, self.to_dict())
        csv = write_atomic(path.with_suffix(".csv"), self.table.to_csv(index=False))
        return path, csv


def load_discovery(path: str | Path) -> Discovery:
    """Read a `Discovery.save` JSON back (its table, meta and framing analysis).

    Raises:
        FlipscopeError: the file is unreadable, not a discovery, or a field is missing (named).
    """
    import pandas as pd

    from flipscope.data.jsonfile import read_json_object

    data = read_json_object(path, "discovery from `flipscope discover`")
    fmt = data.get("format")
    if fmt != "flipscope-discovery/2":
        raise FlipscopeError(f"{str(path)!r} is not a discovery from flipscope discover (format {fmt!r})")
    for name, kind in (("hook", str), ("meta", dict), ("features", list), ("framing", dict)):
        if not isinstance(data.get(name), kind):
            raise FlipscopeError(f"discovery {str(path)!r}: field {name!r} is missing or not a {kind.__name__}")
    if not isinstance(data["meta"].get("sae"), dict):
        raise FlipscopeError(f"discovery {str(path)!r}: field 'meta.sae' is missing or not an object")
    return Discovery(
        table=pd.DataFrame(data["features"]), hook=data["hook"], layers=data.get("layers") or [],
        diffmean=data.get("diffmean") or {}, ablation=data.get("ablation"), meta=data["meta"],
        framing=data["framing"],
    )  # fmt: skip


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
        "sae": {"hook": hook, "d_sae": int(sae.cfg.d_sae), "d_in": int(sae.cfg.d_in), "digest": sae_digest(sae)},
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
    per_case = attribution_scores(
        vlm, sae, hook, pairs, batch_size=batch_size, include_controls=True, progress=progress
    )
    n_flips = int(pairs.is_flip.sum())
    shift = pairs.margin_shift.double().numpy()
    table = feature_table(
        delta_f, shift, pairs.is_flip, attribution=per_case[:n_flips].mean(0), n_boot=n_boot, seed=seed
    )
    floor = float((bank.get("rules") or {}).get("min_margin") or 0.0)
    analysis = _framing(vlm, sae, hook, pairs, delta_f, shift, per_case, seed, floor)
    table = with_framing(table, analysis)
    diffmean = _diffmean_summary(sae, pairs, hook)
    ablation = None
    if exact_top > 0:
        ablation = check_attribution(
            vlm, sae, hook, pairs, per_case[:n_flips], delta_f, exact_top, batch_size, progress
        )
    meta = _meta(vlm, sae, bank, hook, pairs, n_boot, seed)
    layers_auc = layer_auc_sweep(pairs, layer_hooks, seed=seed)
    return Discovery(
        table=table, hook=hook, layers=layers_auc, diffmean=diffmean, ablation=ablation, meta=meta,
        framing=analysis.to_dict(),
    )  # fmt: skip


def _framing(
    vlm: VLM,
    sae: Any,
    hook: str,
    pairs: PairActivations,
    delta_f: Float[np.ndarray, "case d_sae"],
    shift: Float[np.ndarray, " case"],
    per_case: Float[np.ndarray, "case d_sae"],
    seed: int,
    min_margin: float,
) -> FramingAnalysis:
    """The framing analysis of the pairs, with the decoder's answer alignment where the model
    exposes its unembedding (an SAE on the heads' `attn.hook_z` read through the output
    projection: `readout.residual_rows`); `min_margin` is the bank's curation floor."""
    readout = {}
    if hasattr(vlm, "hf_model"):
        rows = residual_rows(sae, vlm, hook)
        readout = {
            "answer_cos": answer_alignment(sae, vlm, rows=rows),
            "answer_cos_threshold": alignment_threshold(sae, rows=rows, seed=seed),
        }
    return framing_analysis(
        delta_f, shift, pairs.cases, hook, margin_orig=pairs.margin_orig.double().numpy(),
        min_margin=min_margin, attribution=per_case,
        decoder=sae.W_dec.detach().double().cpu().numpy(), resid_delta=pairs.delta(hook).double().numpy(),
        seed=seed, **readout,
    )  # fmt: skip


def with_framing(table: Any, analysis: FramingAnalysis) -> Any:
    """`table` with the framing analysis's per-feature columns: each ranking's family-wise p under
    its pair-swap null (`<ranking>_p_null`), and with family-matched pairs framing_shift,
    framing_t, answer_shift, answer_t, answer_cos, framing_share, label and rank_framing, sorted
    by rank_framing (else as it was)."""
    table = table.sort_values("feature").reset_index(drop=True)
    for name, test in analysis.nulls.items():
        table[f"{name}_p_null"] = test.p_family
    spec = analysis.specificity
    if spec is None:
        return table.sort_values("rank_pearson").reset_index(drop=True)
    columns = {"framing_shift": spec.framing_shift, "framing_t": spec.framing_t, "answer_shift": spec.answer_shift,
               "answer_t": spec.answer_t, "answer_cos": spec.answer_cos, "framing_share": spec.share}  # fmt: skip
    for name, values in columns.items():
        if values is not None:
            table[name] = values
    table["label"] = spec.labels
    rank = np.empty(len(table), dtype=np.int64)
    rank[spec.ranked()] = np.arange(1, len(table) + 1)
    table["rank_framing"] = rank
    return table.sort_values("rank_framing").reset_index(drop=True)
