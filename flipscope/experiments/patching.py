"""Causal patching: remove a feature's contribution at the hooked layer and see whether the flip undoes.

**Delta-only patching** (the paper's protocol): x_patched = x_para − Σ_f Δf · W_dec[f] at the last
prompt position, Δf = f(x_para) − f(x_orig). Only the chosen features' decoder directions are
subtracted, so the SAE error term stays in. With `positions="question"` the features are moved,
at each of the paraphrase's question tokens, to the original's mean over its question; with
`"all"`, also at each position of the template's tail after the question to the original's value
there, the last position's patch included (`flipscope.experiments.span_patch`). **Original-value
patching** puts the original's whole activation vector in place of the paraphrase's (no SAE).

Per case: the margins of the original, the paraphrase and the patched paraphrase; **recovery**
= (m_patched − m_para) / (m_orig − m_para); **reversed** when the patched answer is the original's.
Controls, always beside: the same patch on the FlipBank's non-flip controls (margins should not
move), and the **matched control features** — for each patched feature, one that does not track
the margin shift and moves as much between original and paraphrase (mean |Δf|) — given the same
patch, each by its own Δf · W_dec (the paper's control "of matched activation magnitude"), with
the size of their patch beside (`control_size_ratio`, the mean over flips of its norm over the
features' patch's: a small SAE may have no feature that moves as much without tracking the shift,
and a control that barely moves proves little). A harsher check sits beside them: the **same-push
control**, the patched features' own amounts Δf laid along the matched controls' decoder rows
instead of their own, so the push is as large and only the features differ.

At the last position the patch and both controls share one forward of each paraphrase up to its
last token, then run on that token alone (`flipscope.interventions.last_token`); where the
matched controls cannot be found (no other feature moves) the patch runs without them and
`setup["no_control"]` says why. The hook functions (`flipscope.interventions.hooks`) are pure
and live only inside `HookedVLM.hooks`, so no hook outlives a run, even one that raises. Sweeps
of one feature or one layer at a time over every case are in `flipscope.experiments.sweeps`.
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
from flipscope.experiments.control_bound import wording_bound
from flipscope.experiments.pairs import PairActivations, collect_pairs, pair_specs
from flipscope.experiments.span_patch import span_hook, span_reference
from flipscope.interventions.hooks import replace_at_last, subtract_at_last
from flipscope.interventions.last_token import subtracted_margins
from flipscope.model.answers import require_finite
from flipscope.model.protocol import VLM
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features, decoder_vectors
from flipscope.sae.load import check_sae
from flipscope.stats import bootstrap, correlations

__all__ = [
    "POSITIONS",
    "PatchResult",
    "matched_control_features",
    "prefix_control_features",
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


def _control_stats(sae: Any, hook: str, pairs: PairActivations) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature, over flips: |Pearson r| of its Δf with the margin shift, whether its Δf varies,
    and its mean |Δf|: what `matched_control_features` matches on."""
    flips = torch.from_numpy(pairs.is_flip)
    f_orig, f_para = (f[flips].double() for f in pairs.features(sae, hook))
    delta = (f_para - f_orig).numpy()
    r = np.abs(correlations(delta, pairs.margin_shift[flips].double().numpy())["r"])
    return r, np.isfinite(r) & (delta.std(0) > 0), np.abs(delta).mean(0)


def _match(stats: tuple[np.ndarray, np.ndarray, np.ndarray], features: Sequence[int], max_abs_r: float) -> list[int]:
    r, moved, size = stats
    allowed = np.ones(len(r), dtype=bool)
    allowed[list(features)] = False
    candidates = np.flatnonzero(allowed & moved & (r < max_abs_r))
    if len(candidates) < len(features):
        ranked = np.flatnonzero(allowed & moved)
        candidates = ranked[np.argsort(r[ranked], kind="stable")][: max(len(features), 5)]
    if len(candidates) < len(features):
        raise FlipscopeError(
            f"only {len(candidates)} other features move between original and paraphrase; "
            f"{len(features)} are needed as matched controls"
        )
    chosen: list[int] = []
    for feature in features:
        free = np.array([c for c in candidates if c not in chosen])
        chosen.append(int(free[np.argmin(np.abs(size[free] - size[feature]))]))
    return chosen


def matched_control_features(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], max_abs_r: float = 0.1
) -> list[int]:
    """For each of `features` in turn, a distinct other feature that does not track the margin
    shift (|Pearson r| of Δf with it, over flips, below `max_abs_r`; else the least correlated)
    and whose patch is as large: its mean |Δf| over flips closest to that feature's. A feature
    whose Δf never varies is no control (its patch would be nothing)."""
    return _match(_control_stats(sae, hook, pairs), features, max_abs_r)


def prefix_control_features(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], max_abs_r: float = 0.1
) -> list[list[int]]:
    """`matched_control_features` of each prefix `features[:k]`, k = 1..len(features), the
    statistics they match on computed once: a count's controls as `patch` would pick them."""
    stats = _control_stats(sae, hook, pairs)
    return [_match(stats, features[:k], max_abs_r) for k in range(1, len(features) + 1)]


def _vectors(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], controls: Sequence[int] | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per case, the delta-only patch vector of `features`; of the matched `controls`, each by its
    own Δf · W_dec; and the same-push control: the features' Δf along the controls' rows."""
    delta = pairs.feature_delta(sae, hook)
    vectors = decoder_vectors(sae, delta[:, list(features)], features)
    if not controls:
        return vectors, None, None
    own = decoder_vectors(sae, delta[:, list(controls)], controls)
    return vectors, own, decoder_vectors(sae, delta[:, list(features)], controls)


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

    def __init__(self, vlm: VLM, sae: Any, hook: str, pairs: PairActivations, features, variant, positions, controls,
                 batch_size: int) -> None:  # fmt: skip
        self.vlm, self.sae, self.hook, self.pairs = vlm, sae, hook, pairs
        self.features, self.variant, self.positions = features, variant, positions
        self.vectors = self.control_vectors = self.push_vectors = self.reference = None
        if variant == "delta" and positions == "last":
            self.vectors, self.control_vectors, self.push_vectors = _vectors(sae, hook, pairs, features, controls)
        if positions != "last":  # each distinct original runs once
            specs, orig_index, _ = pair_specs(pairs.cases)
            distinct = sorted(set(orig_index))
            reference = span_reference(vlm, sae, hook, [specs[i] for i in distinct], features, batch_size)
            row = {prompt: k for k, prompt in enumerate(distinct)}
            self.reference = reference.take([row[i] for i in orig_index])

    def last_token_margins(self, batch_size: int, fast: bool, progress: bool) -> tuple[Tensor, list[Tensor]]:
        """Delta-only at the last position: the margins under the features' patch and under each
        control's, every paraphrase run once up to its last token (`batch_size` prompts, each
        distinct film through the tower once) and its last token once per patch
        (`flipscope.interventions.last_token`)."""
        patches = [v for v in (self.vectors, self.control_vectors, self.push_vectors) if v is not None]
        specs, stacked = self.pairs.paraphrase_specs(), torch.stack(patches, 1)
        rows = batch_size * len(patches)
        margins = subtracted_margins(self.vlm, specs, self.hook, stacked, rows, fast=fast, progress=progress)
        return margins[:, 0], list(margins[:, 1:].T)

    def hook_fn(self, chunk: list, inputs: Any, start: int, stop: int):
        if self.variant == "original":
            return replace_at_last(self.pairs.orig[self.hook][start:stop])
        reference = self.reference.take(range(start, stop))
        return span_hook(self.vlm, self.sae, self.features, reference, chunk, inputs, self.positions)


def _controls(
    sae: Any, hook: str, pairs: PairActivations, features: Sequence[int], given
) -> tuple[list[int] | None, str | None]:
    """The matched controls, chosen (`"auto"`) or given, one per feature, none of them patched;
    and why there are none where `"auto"` finds too few (an SAE whose other features never move
    between original and paraphrase has no control to offer: the patch runs, called unspecific)."""
    if given == "auto":
        try:
            return matched_control_features(sae, hook, pairs, features), None
        except FlipscopeError as err:
            return None, str(err)
    controls = [int(c) for c in given]
    check_features(sae, controls)
    if len(controls) != len(features) or set(controls) & set(features):
        raise FlipscopeError(
            f"control features {controls} must be one per patched feature {list(features)}, none of them"
        )
    return controls, None


def _size_ratio(patcher: _Patcher, pairs: PairActivations) -> float:
    """Mean over flips of |the matched controls' own patch| / |the features' patch|."""
    flips = torch.from_numpy(pairs.is_flip)
    own, features = patcher.control_vectors[flips].norm(dim=1), patcher.vectors[flips].norm(dim=1)
    return float((own / features.clamp_min(1e-12)).double().mean())


def _full_forwards(vlm: VLM, patcher: _Patcher, pairs: PairActivations, batch_size: int, progress: bool) -> Tensor:
    """Margins of every paraphrase under a patch that is not the last position's alone."""
    para_specs, patched = pairs.paraphrase_specs(), []
    for start in tqdm(range(0, len(para_specs), batch_size), desc="patching", disable=not progress):
        stop = min(start + batch_size, len(para_specs))
        chunk = para_specs[start:stop]
        inputs = vlm.prompts.build(chunk)
        with vlm.hooks(fwd_hooks=[(patcher.hook, patcher.hook_fn(chunk, inputs, start, stop))]):
            patched.append(vlm.score(inputs))
    return torch.cat(patched)


def _case_rows(pairs: PairActivations, m_patched: Tensor, controlled: list[Tensor]) -> list[dict[str, Any]]:
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
        if controlled:
            row["m_control_feature"], row["m_same_push"] = float(controlled[0][i]), float(controlled[1][i])
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
    control_features: Sequence[int] | str | None = "auto",
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    fast: bool = True,
    wording: Mapping[str, float] | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch every case of the bank (flips and non-flip controls) and summarize.

    Args:
        features: SAE features to remove together (delta-only); None with `variant="original"`.
        variant: `"delta"` (remove Δf · W_dec) or `"original"` (the original's activation
            vector at the SAE's hook, last position).
        positions: `"last"`, `"question"` or `"all"` (delta only; see the module docstring).
        control_features: The matched control features, one per feature: `"auto"`
            (`matched_control_features`), the indices, or None (no control).
        fast: Delta-only at the last position, run each paraphrase once up to its last token and
            the last token once per patch (the features', each control's); else full forwards.
        wording: Each non-flip's |margin change| when its own framing words are corrupted
            (`framing_word_shifts`): the non-flips' change under the patch is judged against it
            (`summary["controls"]["wording_bound"]`).

    Raises:
        FlipscopeError: bad feature, variant or positions; SAE or bank not of this model.
    """
    hook = check_sae(sae, vlm)
    _check_setup(sae, features, variant, positions)
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    controls, no_control = None, None
    if variant == "delta" and positions == "last" and control_features is not None:
        controls, no_control = _controls(sae, hook, pairs, features, control_features)
    patcher = _Patcher(vlm, sae, hook, pairs, features, variant, positions, controls, batch_size)
    if patcher.vectors is not None:
        patched_all, controlled_all = patcher.last_token_margins(batch_size, fast, progress)
    else:
        patched_all, controlled_all = _full_forwards(vlm, patcher, pairs, batch_size, progress), []
    names = ("patched", "control-feature", "same-push control")[: 1 + len(controlled_all)]
    for name, m in zip(names, [patched_all, *controlled_all], strict=True):
        require_finite(m, lambda i: f"case {pairs.cases[i]['id']!r}", f"{name} margin")
    rows = _case_rows(pairs, patched_all, controlled_all)
    summary = summarize_patch(rows)
    summary["setup"] = {
        "hook": hook,
        "features": None if features is None else [int(f) for f in features],
        "variant": variant,
        "positions": positions,
        "control_features": controls,
        "control_size_ratio": _size_ratio(patcher, pairs) if controls else None,
    }
    if no_control:
        summary["setup"]["no_control"] = no_control
    if wording is not None and "controls" in summary:
        changes = {r["case"]: r["m_patched"] - r["m_para"] for r in rows if r["kind"] == "control"}
        summary["controls"]["wording_bound"] = wording_bound(changes, wording)
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
    if flips and "m_same_push" in flips[0]:
        summary["same_push_control"] = flips_block(flips, "m_same_push")
    return summary
