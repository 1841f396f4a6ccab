"""Causal patching: remove a feature's contribution at the hooked layer and see whether the flip undoes.

**Delta-only patching** (the paper's protocol): x_patched = x_para − Σ_f Δf · W_dec[f] at the last
prompt position, Δf = f(x_para) − f(x_orig). Only the chosen features' decoder directions are
subtracted, so the SAE error term stays in. With `positions="question"` or `"all"` the feature is
moved, at every such position of the paraphrase, from its value there to the original's mean
value over the same span (for the last position alone this is exactly Δf). **Original-value
patching** puts the original's whole activation vector in place of the paraphrase's (no SAE).

Per case: the margins of the original, the paraphrase and the patched paraphrase; **recovery**
= (m_patched − m_para) / (m_orig − m_para); **reversed** when the patched answer is the original's.
Controls, always beside: the same patch on the FlipBank's non-flip controls (margins should not
move) and a **matched control feature** — one that does not track the margin shift, with the mean
activation closest to the patched feature's — moved by the same amount along its own decoder row.

The hook functions are pure (built from the vectors they apply) and live only inside
`HookedVLM.hooks`, so no hook outlives a run, even one that raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from flipscope.errors import FlipscopeError
from flipscope.fastpath import score_last_token
from flipscope.pairs import PairActivations, collect_pairs, pair_specs
from flipscope.sae import check_sae, feature_encoder
from flipscope.stats import bootstrap, correlations
from flipscope.store import ResultStore

__all__ = [
    "POSITIONS",
    "PatchResult",
    "decoder_vectors",
    "layer_sweep",
    "matched_control_feature",
    "patch_bank",
    "patch_sweep",
    "patched_margins",
    "recovery",
    "replace_at_last",
    "shift_features_hook",
    "subtract_at_last",
    "summarize_patch",
]

POSITIONS = ("last", "question", "all")


# ----------------------------------------------------------------------------------- hooks
def decoder_vectors(
    sae: Any, amounts: Float[Tensor, "batch n_features"], features: Sequence[int]
) -> Float[Tensor, "batch d_model"]:
    """Σ_f amounts[:, f] · W_dec[f]: the residual change of moving `features` by `amounts`.

    Raises:
        FlipscopeError: a feature index is outside the SAE.
    """
    check_features(sae, features)
    w_dec = sae.W_dec.detach()[list(features)]
    return amounts.to(w_dec.dtype) @ w_dec


def check_features(sae: Any, features: Sequence[int]) -> None:
    """Raise a `FlipscopeError` naming the first feature index outside the SAE."""
    if not len(features):
        raise FlipscopeError("no features given")
    bad = [int(f) for f in features if not 0 <= int(f) < sae.cfg.d_sae]
    if bad:
        raise FlipscopeError(
            f"feature index {bad[0]} is out of range; the SAE has {sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})"
        )


def subtract_at_last(vectors: Float[Tensor, "batch d_model"]):
    """A hook that subtracts one vector per row at the last position (inputs are left-padded)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, -1] -= vectors.to(x.dtype)
        return x

    return hook


def replace_at_last(values: Float[Tensor, "batch d_model"], rows: Bool[Tensor, " batch"] | None = None):
    """A hook that puts `values` at the last position (of `rows` only, if given)."""

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        x = x.clone()
        keep = slice(None) if rows is None else rows.to(x.device)
        x[keep, -1] = values[keep].to(x.dtype)
        return x

    return hook


def shift_features_hook(
    sae: Any,
    features: Sequence[int],
    target: Float[Tensor, "*target n_features"],
    mask: Bool[Tensor, "batch pos"] | None = None,
):
    """A hook that moves `features` to `target` (broadcast over [batch, pos]) at the positions in
    `mask` (default: every position): x ← x − (f(x) − target) · W_dec, computed from the
    activations as they arrive. Clamping and span patching both use it."""
    w_dec = sae.W_dec.detach()[torch.tensor(list(features))]
    encode = feature_encoder(sae, features)

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        current = encode(x)
        shift = current - target.to(current)
        if mask is not None:
            shift = shift * mask[..., None].to(current)
        return x - (shift @ w_dec).to(x.dtype)

    return hook


@torch.no_grad()
def patched_margins(
    vlm: Any, inputs: Any, hook_name: str, vectors: Float[Tensor, "batch d_model"]
) -> Float[Tensor, " batch"]:
    """Margins with `vectors` subtracted at `hook_name`, last position, one per row."""
    with vlm.hooks(fwd_hooks=[(hook_name, subtract_at_last(vectors))]):
        return vlm.score(inputs)


def recovery(
    m_orig: Float[Tensor, " case"], m_para: Float[Tensor, " case"], m_patched: Float[Tensor, " case"]
) -> Float[Tensor, " case"]:
    """(m_patched − m_para) / (m_orig − m_para): 0 = no change, 1 = back to the original margin."""
    return (m_patched - m_para) / (m_orig - m_para)


# ----------------------------------------------------------------------------------- one patch
@dataclass
class PatchResult:
    """Per-case rows and their summary (see `summarize_patch`)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def matched_control_feature(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], max_abs_r: float = 0.1
) -> int:
    """A feature that does not track the margin shift (|Pearson r| of Δf with it, over flips,
    below `max_abs_r`; else the least correlated), not among `features`, whose mean activation on
    the flip paraphrases is closest to that of `features[0]`."""
    flips = torch.from_numpy(pairs.is_flip)
    f_orig, f_para = (f[flips].double() for f in pairs.features(sae, hook))
    r = np.abs(correlations((f_para - f_orig).numpy(), pairs.margin_shift[flips].double().numpy())["r"])
    active = (f_para > 0).any(0).numpy()
    allowed = np.ones(len(r), dtype=bool)
    allowed[list(features)] = False
    candidates = np.flatnonzero(allowed & active & (r < max_abs_r))
    if not len(candidates):
        candidates = np.flatnonzero(allowed & active)
        candidates = candidates[np.argsort(r[candidates])][:5]
    if not len(candidates):
        raise FlipscopeError("no other active feature to serve as a matched control")
    level = f_para.mean(0).numpy()
    return int(candidates[np.argmin(np.abs(level[candidates] - level[features[0]]))])


def _vectors(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], control: int | None
) -> tuple[Tensor, Tensor | None]:
    """Per case, the delta-only patch vector of `features`, and of the matched control: the same
    norm along the control feature's unit decoder row."""
    delta = pairs.feature_delta(sae, hook)
    vectors = decoder_vectors(sae, delta[:, list(features)], features)
    if control is None:
        return vectors, None
    row = sae.W_dec.detach()[control]
    return vectors, vectors.norm(dim=1, keepdim=True) * (row / row.norm())


def _span_reference(
    vlm: Any, sae: Any, hook: str, specs: list, features: Sequence[int], positions: str, batch_size: int
):
    """Mean activation of `features` over the span of each original prompt."""
    out = []
    for start in range(0, len(specs), batch_size):
        chunk = specs[start : start + batch_size]
        inputs = vlm.prompts.build(chunk)
        acts = vlm.run_with_cache(inputs, names_filter=hook, logits_to_keep=1)[1][hook]
        mask = inputs.attention_mask.bool() if positions == "all" else vlm.prompts.question_mask(chunk, inputs)
        mask = mask.to(acts.device)
        with torch.no_grad():
            feats = sae.encode(acts.to(sae.dtype))[..., list(features)]
        out.append((feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


@torch.no_grad()
def patch_bank(
    vlm: Any,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int] | None,
    *,
    variant: str = "delta",
    positions: str = "last",
    control_feature: int | str | None = "auto",
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> PatchResult:
    """Patch every case of the bank (flips and non-flip controls) and summarize.

    Args:
        features: SAE features to remove together (delta-only); None with `variant="original"`.
        variant: `"delta"` (remove Δf · W_dec) or `"original"` (the original's activation
            vector at the SAE's hook, last position).
        positions: `"last"`, `"question"` or `"all"` (delta only; see the module docstring).
        control_feature: The matched control feature, `"auto"` (`matched_control_feature`) or
            None (no control).

    Raises:
        FlipscopeError: bad feature, variant or positions; SAE or bank not of this model.
    """
    hook = check_sae(sae, vlm)
    if variant not in ("delta", "original"):
        raise FlipscopeError(f"variant {variant!r} is unknown; expected 'delta' or 'original'")
    if positions not in POSITIONS:
        raise FlipscopeError(f"positions {positions!r} is unknown; expected one of {POSITIONS}")
    if variant == "delta":
        check_features(sae, features or [])
    elif positions != "last":
        raise FlipscopeError("original-value patching is defined at the last position only")
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    specs, orig_index, para_index = pair_specs(pairs.cases)
    para_specs = [specs[i] for i in para_index]  # the originals are needed too, for span references
    control = None
    if variant == "delta" and positions == "last" and control_feature is not None:
        control = (
            matched_control_feature(sae, hook, pairs, features) if control_feature == "auto" else int(control_feature)
        )
        check_features(sae, [control])
    if variant == "delta" and positions == "last":
        vectors, control_vectors = _vectors(sae, hook, pairs, features, control)
    reference = None
    if positions != "last":
        reference = _span_reference(vlm, sae, hook, [specs[i] for i in orig_index], features, positions, batch_size)
    patched, controlled = [], []
    for start in tqdm(range(0, len(para_specs), batch_size), desc="patching", disable=not progress):
        stop = min(start + batch_size, len(para_specs))
        chunk = para_specs[start:stop]
        inputs = vlm.prompts.build(chunk)
        if variant == "original":
            fn = replace_at_last(pairs.orig[hook][start:stop])
        elif positions == "last":
            fn = subtract_at_last(vectors[start:stop])
        else:
            mask = inputs.attention_mask.bool() if positions == "all" else vlm.prompts.question_mask(chunk, inputs)
            fn = shift_features_hook(sae, features, reference[start:stop, None], mask)
        with vlm.hooks(fwd_hooks=[(hook, fn)]):
            patched.append(vlm.score(inputs))
        if control is not None:
            controlled.append(patched_margins(vlm, inputs, hook, control_vectors[start:stop]))
    m_patched = torch.cat(patched)
    m_control = torch.cat(controlled) if controlled else None
    rows = []
    for i, case in enumerate(pairs.cases):
        row = {
            "case": case["id"],
            "kind": "flip" if pairs.is_flip[i] else "control",
            "direction": case.get("direction"),
            "m_orig": float(pairs.margin_orig[i]),
            "m_para": float(pairs.margin_para[i]),
            "m_patched": float(m_patched[i]),
        }
        if m_control is not None:
            row["m_control_feature"] = float(m_control[i])
        rows.append(row)
    summary = summarize_patch(rows)
    summary["setup"] = {
        "hook": hook,
        "features": None if features is None else [int(f) for f in features],
        "variant": variant,
        "positions": positions,
        "control_feature": control,
    }
    return PatchResult(rows=rows, summary=summary)


def summarize_patch(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Recovery and reversal over flip rows (mean and median recovery, share > 50%, share
    reversed; overall and by direction), margin change on control rows, and the matched control
    feature's recovery — each a bootstrap 95% CI over cases."""

    def flips_block(group: Sequence[Mapping[str, Any]], key: str = "m_patched") -> dict[str, Any]:
        m_orig = np.array([r["m_orig"] for r in group], dtype=np.float64)
        m_para = np.array([r["m_para"] for r in group], dtype=np.float64)
        m_new = np.array([r[key] for r in group], dtype=np.float64)
        rec = (m_new - m_para) / (m_orig - m_para)
        return {
            "n": len(group),
            "mean_recovery": bootstrap(rec, seed=seed).to_dict(),
            "median_recovery": bootstrap(rec, np.median, seed=seed).to_dict(),
            "share_recovered_over_half": bootstrap(rec > 0.5, seed=seed).to_dict(),
            "share_reversed": bootstrap((m_new > 0) == (m_orig > 0), seed=seed).to_dict(),
            "mean_margin_change": bootstrap(m_new - m_para, seed=seed).to_dict(),
        }

    flips = [r for r in rows if r["kind"] == "flip"]
    controls = [r for r in rows if r["kind"] == "control"]
    if not flips:
        raise FlipscopeError("no flip cases to summarize")
    summary: dict[str, Any] = {"flips": flips_block(flips)}
    summary["by_direction"] = {
        d: flips_block([r for r in flips if r["direction"] == d]) for d in sorted({r["direction"] for r in flips})
    }
    if controls:
        change = np.array([r["m_patched"] - r["m_para"] for r in controls], dtype=np.float64)
        answer_kept = np.array([(r["m_patched"] > 0) == (r["m_para"] > 0) for r in controls])
        summary["controls"] = {
            "n": len(controls),
            "mean_margin_change": bootstrap(change, seed=seed).to_dict(),
            "mean_abs_margin_change": bootstrap(np.abs(change), seed=seed).to_dict(),
            "share_answer_kept": bootstrap(answer_kept, seed=seed).to_dict(),
        }
    if flips and "m_control_feature" in flips[0]:
        summary["matched_control_feature"] = flips_block(flips, "m_control_feature")
    return summary


# ----------------------------------------------------------------------------------- sweeps
def _sweep(
    vlm: Any,
    pairs: PairActivations,
    header: dict[str, Any],
    store_path: Any,
    n_variants: int,
    hooks_for: Any,
    labels: list[Any],
    *,
    fast: bool,
    rows_per_forward: int,
    progress: bool,
    desc: str,
) -> ResultStore:
    """Run `n_variants` hooked variants of every case's paraphrase into a resumable store.

    Cases go in fixed chunks (so a resumed run recomputes whole chunks exactly as before) of
    about `rows_per_forward / n_variants` cases; `hooks_for(indices)` gives the hooks for the
    chunk's case × variant rows, case-major.
    """
    per_chunk = max(1, rows_per_forward // n_variants)
    header = {**header, "fast": fast, "cases_per_unit": per_chunk}
    store = ResultStore.open(store_path, header)
    para_specs = pairs.paraphrase_specs()
    chunks = [list(range(i, min(i + per_chunk, len(pairs.cases)))) for i in range(0, len(pairs.cases), per_chunk)]
    todo = [(k, chunk) for k, chunk in enumerate(chunks) if f"cases/{k}" not in store.done]
    for k, chunk in tqdm(todo, desc=desc, disable=not progress):
        chunk_specs = [para_specs[i] for i in chunk]
        fwd_hooks = hooks_for(chunk)
        if fast:
            margins = score_last_token(vlm, vlm.prompts, chunk_specs, n_variants, fwd_hooks)
        else:
            rows = [spec for spec in chunk_specs for _ in range(n_variants)]
            with torch.no_grad(), vlm.hooks(fwd_hooks=fwd_hooks):
                margins = vlm.score(vlm.prompts.build(rows)).reshape(len(chunk), n_variants)
        out = []
        for i, case_margins in zip(chunk, margins.tolist(), strict=True):
            case = pairs.cases[i]
            for label, m in zip(labels, case_margins, strict=True):
                out.append(
                    {
                        "case": case["id"],
                        "kind": "flip" if pairs.is_flip[i] else "control",
                        "direction": case.get("direction"),
                        "variant": label,
                        "m_orig": float(pairs.margin_orig[i]),
                        "m_para": float(pairs.margin_para[i]),
                        "m_patched": m,
                    }
                )
        store.append(f"cases/{k}", out)
    return store


def patch_sweep(
    vlm: Any,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int],
    store_path: Any,
    *,
    fast: bool = True,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    rows_per_forward: int = 1024,
    progress: bool = True,
) -> ResultStore:
    """Delta-only patch of each feature in `features` alone, on every case, into a resumable
    store (one unit per case; rows carry `variant` = the feature).

    With `fast`, each case's prompt runs once up to its last token and the last token once per
    feature on that cache (`score_last_token`); otherwise every variant is a full forward.
    """
    hook = check_sae(sae, vlm)
    check_features(sae, features)
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    delta = pairs.feature_delta(sae, hook)[:, list(features)]
    w_dec = sae.W_dec.detach()[list(features)]
    header = {
        "kind": "patch-sweep",
        "hook": hook,
        "features": [int(f) for f in features],
        "model": vlm.identity(),
        "bank": bank.get("source", {}).get("questions"),
        "n_cases": len(pairs.cases),
    }

    def hooks_for(chunk: list[int]) -> list:
        vectors = (delta[chunk][:, :, None] * w_dec).reshape(-1, w_dec.shape[1])  # case-major rows
        return [(hook, subtract_at_last(vectors))]

    labels = [int(f) for f in features]
    return _sweep(
        vlm,
        pairs,
        header,
        store_path,
        len(features),
        hooks_for,
        labels,
        fast=fast,
        rows_per_forward=rows_per_forward,
        progress=progress,
        desc="feature sweep",
    )


def layer_sweep(
    vlm: Any,
    bank: Mapping[str, Any],
    store_path: Any,
    *,
    layers: Sequence[int] | None = None,
    fast: bool = True,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    rows_per_forward: int = 1024,
    progress: bool = True,
) -> ResultStore:
    """Original-value patching at each layer's `hook_resid_post`, last position, on every case:
    where along the depth the original's state still undoes the flip (rows: `variant` = layer)."""
    layers = list(range(vlm.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [layer for layer in layers if not 0 <= layer < vlm.n_layers]
    if bad:
        raise FlipscopeError(f"layers {bad} do not exist; the model has layers 0..{vlm.n_layers - 1}")
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, names, batch_size=batch_size, progress=progress)
    header = {
        "kind": "layer-sweep",
        "layers": layers,
        "model": vlm.identity(),
        "bank": bank.get("source", {}).get("questions"),
        "n_cases": len(pairs.cases),
    }

    def hooks_for(chunk: list[int]) -> list:
        variant = torch.arange(len(names)).repeat(len(chunk))  # case-major: rows cycle through layers
        out = []
        for k, name in enumerate(names):
            values = pairs.orig[name][chunk].repeat_interleave(len(names), dim=0)
            out.append((name, replace_at_last(values, variant == k)))
        return out

    return _sweep(
        vlm,
        pairs,
        header,
        store_path,
        len(names),
        hooks_for,
        layers,
        fast=fast,
        rows_per_forward=rows_per_forward,
        progress=progress,
        desc="layer sweep",
    )
