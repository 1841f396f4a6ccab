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

The hook functions (`flipscope.interventions.hooks`) are pure and live only inside
`HookedVLM.hooks`, so no hook outlives a run, even one that raises. Sweeps of one feature or
one layer at a time over every case are in `flipscope.experiments.sweeps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.errors import FlipscopeError
from flipscope.experiments.pairs import PairActivations, collect_pairs, pair_specs
from flipscope.interventions.hooks import replace_at_last, shift_features_hook, subtract_at_last
from flipscope.model.answers import require_finite
from flipscope.model.protocol import VLM
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features, decoder_vectors
from flipscope.sae.load import check_sae
from flipscope.stats import bootstrap, correlations

__all__ = [
    "POSITIONS",
    "PatchResult",
    "matched_control_feature",
    "patch_bank",
    "patched_margins",
    "recovery",
    "summarize_patch",
]

POSITIONS = ("last", "question", "all")


@torch.no_grad()
def patched_margins(
    vlm: VLM, inputs: Any, hook_name: str, vectors: Float[Tensor, "batch d_model"]
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
    vlm: VLM, sae: Any, hook: str, specs: list, features: Sequence[int], positions: str, batch_size: int
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


def _check_setup(sae: Any, features: Sequence[int] | None, variant: str, positions: str) -> None:
    if variant not in ("delta", "original"):
        raise FlipscopeError(f"variant {variant!r} is unknown; expected 'delta' or 'original'")
    if positions not in POSITIONS:
        raise FlipscopeError(f"positions {positions!r} is unknown; expected one of {POSITIONS}")
    if variant == "delta":
        check_features(sae, features or [])
    elif positions != "last":
        raise FlipscopeError("original-value patching is defined at the last position only")


class _Patcher:
    """The hook that patches a batch of paraphrases (`start:stop` of the bank's cases)."""

    def __init__(self, vlm: VLM, sae: Any, hook: str, pairs: PairActivations, features, variant, positions, control,
                 batch_size: int) -> None:  # fmt: skip
        self.vlm, self.sae, self.hook, self.pairs = vlm, sae, hook, pairs
        self.features, self.variant, self.positions = features, variant, positions
        self.vectors = self.control_vectors = self.reference = None
        if variant == "delta" and positions == "last":
            self.vectors, self.control_vectors = _vectors(sae, hook, pairs, features, control)
        if positions != "last":
            specs, orig_index, _ = pair_specs(pairs.cases)
            originals = [specs[i] for i in orig_index]
            self.reference = _span_reference(vlm, sae, hook, originals, features, positions, batch_size)

    def hook_fn(self, chunk: list, inputs: Any, start: int, stop: int):
        if self.variant == "original":
            return replace_at_last(self.pairs.orig[self.hook][start:stop])
        if self.positions == "last":
            return subtract_at_last(self.vectors[start:stop])
        prompts = self.vlm.prompts
        mask = inputs.attention_mask.bool() if self.positions == "all" else prompts.question_mask(chunk, inputs)
        return shift_features_hook(self.sae, self.features, self.reference[start:stop, None], mask)


def _case_rows(pairs: PairActivations, m_patched: Tensor, m_control: Tensor | None) -> list[dict[str, Any]]:
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
    return rows


@torch.no_grad()
@images_once
def patch_bank(
    vlm: VLM,
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
    _check_setup(sae, features, variant, positions)
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    control = None
    if variant == "delta" and positions == "last" and control_feature is not None:
        auto = control_feature == "auto"
        control = matched_control_feature(sae, hook, pairs, features) if auto else int(control_feature)
        check_features(sae, [control])
    patcher = _Patcher(vlm, sae, hook, pairs, features, variant, positions, control, batch_size)
    para_specs = pairs.paraphrase_specs()
    patched, controlled = [], []
    for start in tqdm(range(0, len(para_specs), batch_size), desc="patching", disable=not progress):
        stop = min(start + batch_size, len(para_specs))
        chunk = para_specs[start:stop]
        inputs = vlm.prompts.build(chunk)
        with vlm.hooks(fwd_hooks=[(hook, patcher.hook_fn(chunk, inputs, start, stop))]):
            patched.append(vlm.score(inputs))
        if control is not None:
            controlled.append(patched_margins(vlm, inputs, hook, patcher.control_vectors[start:stop]))
    patched_all, controlled_all = torch.cat(patched), torch.cat(controlled) if controlled else None
    require_finite(patched_all, lambda i: f"case {pairs.cases[i]['id']!r}", "patched margin")
    if controlled_all is not None:
        require_finite(controlled_all, lambda i: f"case {pairs.cases[i]['id']!r}", "control-feature margin")
    rows = _case_rows(pairs, patched_all, controlled_all)
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
