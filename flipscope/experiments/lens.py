"""The logit lens of the answer, layer by layer: where a flip's paraphrase parts from its original,
and from which layer the answer is decided.

The lens reads a residual stream as if it were the last layer's: the final norm (Gemma's
`1 + w` gain), then the yes and no rows of the unembedding, and the yes-minus-no margin exactly as
`flipscope.model.answers.yes_no_margin` reads the real logits (only those rows are multiplied, so
a 262k vocabulary costs nothing). At the last layer the lens margin *is* the model's margin.

Per layer, a flip's **divergence** is |lens(x_para) − lens(x_orig)| at the answer position; the
same for the bank's same-family non-flips says how far a wording moves the lens when the answer
holds. Where the flips' divergence first exceeds the non-flips' (a ratio whose CI lies above 1),
the framing has started to act on the answer. A paraphrase's **commit layer** is the first layer
from which the lens gives its final answer at every later layer.

Flips are chosen for crossing zero, so their shifts are large by selection alone. The **selection
null** says how large: the cases' shift trajectories are shuffled among cases of the same wording,
flips are re-selected as the shuffled shifts that carry their original across zero, and the ratio
is recomputed. A ratio beyond that null says the wording moves the flips more than a shift drawn at
random from the same wording's shifts would have to; one within it says no more than selection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

from flipscope.experiments.pairs import PairActivations, collect_pairs
from flipscope.model.families.base import text_config_cap
from flipscope.model.families.sites import find_language_model
from flipscope.model.hook_names import resid_post
from flipscope.model.protocol import VLM

__all__ = ["LensTrajectory", "lens_margins", "lens_trajectory"]


@torch.no_grad()
def lens_margins(vlm: VLM, acts: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    """The yes-minus-no margin the model would give if `acts` were its last layer's output."""
    hf = vlm.hf_model
    norm = find_language_model(hf).norm
    tokens = vlm.answer_tokens
    ids = [*tokens.yes_ids, *tokens.no_ids]
    rows = hf.get_output_embeddings().weight.detach()[ids].float()
    normed = norm(acts.to(norm.weight.dtype)).float()  # the model's own final norm
    logits = normed @ rows.T.to(normed.device)
    cap = vlm.logit_cap if hasattr(vlm, "logit_cap") else text_config_cap(hf)  # as the forward caps them
    if cap:
        logits = torch.tanh(logits / cap) * cap
    n_yes = len(tokens.yes_ids)
    return torch.logsumexp(logits[..., :n_yes], -1) - torch.logsumexp(logits[..., n_yes:], -1)


@dataclass(frozen=True)
class LensTrajectory:
    """Lens margins of every FlipBank case's two prompts at each layer.

    Attributes:
        layers: The layers read (each `blocks.L.hook_resid_post`).
        orig: Lens margin of each case's original, per layer.
        para: Lens margin of each case's paraphrase, per layer.
        is_flip: Which cases are flips (the rest are same-family non-flip controls).
        final_orig: The model's own margin of each original.
        final_para: The model's own margin of each paraphrase.
        family: Each case's wording (the paraphrase's `prompt_index`, else its `strategy`), within
            which the selection null shuffles; None shuffles over the whole bank.
    """

    layers: list[int]
    orig: Float[np.ndarray, "layer case"]
    para: Float[np.ndarray, "layer case"]
    is_flip: Bool[np.ndarray, " case"]
    final_orig: Float[np.ndarray, " case"]
    final_para: Float[np.ndarray, " case"]
    family: np.ndarray | None = None

    @property
    def divergence(self) -> Float[np.ndarray, "layer case"]:
        """|lens(paraphrase) − lens(original)| per layer and case."""
        return np.abs(self.para - self.orig)

    def commit_layers(self, which: str = "para") -> Float[np.ndarray, " case"]:
        """Per case, the first layer from which the lens gives the prompt's final answer at every
        later layer read (NaN if even the last layer read disagrees)."""
        lens, final = (self.para, self.final_para) if which == "para" else (self.orig, self.final_orig)
        agrees = (lens > 0) == (final > 0)[None, :]
        # from layer k on, all agree: reverse cumulative AND
        tail = np.flip(np.logical_and.accumulate(np.flip(agrees, 0), 0), 0)
        first = np.argmax(tail, axis=0)
        layers = np.asarray(self.layers, dtype=float)
        return np.where(tail.any(0), layers[first], np.nan)

    def selection_null(self, *, n_perm: int = 1000, seed: int = 0) -> list[dict[str, Any] | None]:
        """Per layer, the flips ÷ non-flips divergence ratio that selecting flips for crossing zero
        gives by itself (the median over shuffles of the shifts within each wording, see the
        module docstring) and the share of shuffles at least as large as the observed ratio (p).
        None where fewer than half the shuffles leave two flips and two non-flips."""
        div, crossing = self.divergence, self.final_para - self.final_orig
        groups = [np.arange(len(self.is_flip))] if self.family is None else [
            np.flatnonzero(self.family == f) for f in np.unique(self.family)
        ]  # fmt: skip
        rng = np.random.default_rng(seed)
        observed = _ratio(div, self.is_flip)
        null = []
        for _ in range(n_perm):
            perm = np.arange(len(self.is_flip))
            for idx in groups:
                perm[idx] = rng.permutation(idx)
            flips = (self.final_orig > 0) != (self.final_orig + crossing[perm] > 0)
            if flips.sum() >= 2 and (~flips).sum() >= 2:
                null.append(_ratio(div[:, perm], flips))
        if observed is None or len(null) < n_perm / 2:
            return [None] * len(self.layers)
        null_ratios = np.asarray(null)
        return [
            {"ratio": float(np.median(null_ratios[:, k])), "n_shuffles": len(null),
             "p_value": float((1 + (null_ratios[:, k] >= observed[k]).sum()) / (1 + len(null)))}
            for k in range(len(self.layers))
        ]  # fmt: skip

    def summary(self, *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
        """Per layer: the flips' and the non-flips' mean divergence, their ratio with a bootstrap
        CI (cases resampled within each group), the point-biserial correlation of divergence with
        being a flip, and the ratio selection alone gives (`selection_null`); the first layer whose
        ratio CI lies above 1 (with at least two flips and two non-flips), the first beyond the
        selection null; the flips' commit layers."""
        div = self.divergence
        flips, controls = div[:, self.is_flip], div[:, ~self.is_flip]
        rng = np.random.default_rng(seed)
        n_f, n_c = flips.shape[1], controls.shape[1]
        rows = []
        if n_c:
            boot_f = flips[:, rng.integers(0, n_f, size=(n_boot, n_f))].mean(-1)
            boot_c = controls[:, rng.integers(0, n_c, size=(n_boot, n_c))].mean(-1)
            ratios, observed = boot_f / np.maximum(boot_c, 1e-12), _ratio(div, self.is_flip)
        for k, layer in enumerate(self.layers):
            row: dict[str, Any] = {
                "layer": int(layer),
                "flips": float(flips[k].mean()),
                "controls": float(controls[k].mean()) if n_c else None,
                "lens_orig": float(self.orig[k, self.is_flip].mean()),
                "lens_para": float(self.para[k, self.is_flip].mean()),
            }
            if n_c:
                low, high = np.quantile(ratios[k], [0.025, 0.975])
                ratio = float(observed[k])
                varied = div[k].std() > 0
                r = float(stats.pearsonr(self.is_flip.astype(float), div[k])[0]) if varied else 0.0
                row |= {"ratio": {"value": ratio, "low": float(low), "high": float(high), "n": n_f}, "r_flip": r}
            rows.append(row)
        if n_c:
            for row, null in zip(rows, self.selection_null(seed=seed), strict=True):
                row["selection"] = null
        comparable = n_f >= 2 and n_c >= 2  # one case resampled never varies: its interval is the others' spread
        above = [row["layer"] for row in rows if comparable and row.get("ratio") and row["ratio"]["low"] > 1]
        beyond = [row["layer"] for row in rows if (row.get("selection") or {}).get("p_value", 1.0) < 0.05]
        commit = self.commit_layers("para")[self.is_flip]
        committed = commit[np.isfinite(commit)]
        return {
            "layers": rows,
            "n_flips": n_f,
            "n_controls": n_c,
            "first_divergent_layer": above[0] if above else None,
            "first_layer_beyond_selection": beyond[0] if beyond else None,
            "commit_layer": {
                "median": float(np.median(committed)) if len(committed) else None,
                "n": int(len(committed)),
                "by_layer": {int(layer): int((committed == layer).sum()) for layer in self.layers},
            },
        }


def _ratio(div: Float[np.ndarray, "layer case"], flips: Bool[np.ndarray, " case"]) -> np.ndarray | None:
    """Per layer, the flips' mean divergence over the non-flips' (None without both)."""
    if not flips.any() or flips.all():
        return None
    return div[:, flips].mean(1) / np.maximum(div[:, ~flips].mean(1), 1e-12)


def _family(case: Mapping[str, Any]) -> Any:
    """A case's wording: its paraphrase's `prompt_index`, else its `strategy`."""
    return case.get("prompt_index", case.get("strategy"))


def lens_trajectory(
    vlm: VLM,
    bank: Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> LensTrajectory:
    """The lens trajectory of every case of `bank` at `layers` (default: all), from `pairs` when
    they already hold those layers' `hook_resid_post` (the demo's do), else one pass over the bank."""
    layers = list(range(vlm.n_layers)) if layers is None else sorted(layers)
    hooks = [resid_post(layer) for layer in layers]
    if pairs is None or any(h not in pairs.orig for h in hooks):
        pairs = collect_pairs(vlm, bank, hooks, batch_size=batch_size, progress=progress)
    orig = torch.stack([lens_margins(vlm, pairs.orig[h]) for h in hooks]).cpu().numpy()
    para = torch.stack([lens_margins(vlm, pairs.para[h]) for h in hooks]).cpu().numpy()
    return LensTrajectory(
        layers=layers,
        orig=orig.astype(np.float64),
        para=para.astype(np.float64),
        is_flip=np.asarray(pairs.is_flip),
        final_orig=pairs.margin_orig.double().cpu().numpy(),
        final_para=pairs.margin_para.double().cpu().numpy(),
        family=None
        if any(_family(c) is None for c in pairs.cases)
        else np.array([str(_family(c)) for c in pairs.cases]),
    )
