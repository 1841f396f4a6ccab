"""FlipBank cases as model runs: the original and paraphrase prompt of every case, with the
image, at the last prompt position of the layers asked for.

Discovery, attribution and patching all start from these activations. Prompts repeat across
cases (an original question is shared by its paraphrases' cases), so each distinct (image,
question) prompt runs once; a film's prompts are batched together, and each batch runs the
tokens before its questions (chat header, image block, the tower) once per distinct film and
its questions on that key/value cache (`flipscope.model.suffix`), where the family allows it.
The margins recomputed here are checked against the bank's: a bank that does not fit the model
is refused rather than analysed.
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

from flipscope.data.flipbank import check_flipbank_model
from flipscope.errors import FlipscopeError
from flipscope.model.answers import require_finite
from flipscope.model.hook_points import check_activation_hook
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.model.suffix import question_runs
from flipscope.model.vision_once import images_once

__all__ = ["PairActivations", "bank_cases", "case_spec", "collect_pairs", "evidence_order", "pair_specs"]

MARGIN_TOLERANCE = 1e-2


def bank_cases(bank: Mapping[str, Any]) -> tuple[list[dict[str, Any]], Bool[np.ndarray, " case"]]:
    """The bank's cases, flips first then controls, and which of them are flips."""
    cases = [*bank["flips"], *bank["controls"]]
    return cases, np.array([True] * len(bank["flips"]) + [False] * len(bank["controls"]))


def case_spec(case: Mapping[str, Any], text: str) -> PromptSpec:
    """`text` asked with the case's evidence: its image, or (a case with no image, made on a
    text-evidence model) its context passage."""
    if case.get("image") is not None:
        return PromptSpec(question=text, image=case["image"])
    return PromptSpec(question=text, condition="context", context=case["context"])


def pair_specs(cases: Sequence[Mapping[str, Any]]) -> tuple[list[PromptSpec], list[int], list[int]]:
    """Distinct prompts of `cases` (with their evidence) and, per case, the index of its original
    and of its paraphrase among them."""
    index: dict[tuple[Any, Any, str], int] = {}
    specs: list[PromptSpec] = []

    def slot(case: Mapping[str, Any], text: str) -> int:
        key = (case.get("image"), case.get("context"), text)
        if key not in index:
            index[key] = len(specs)
            specs.append(case_spec(case, text))
        return index[key]

    originals = [slot(c, c["original"]) for c in cases]
    paraphrases = [slot(c, c["paraphrase"]) for c in cases]
    return specs, originals, paraphrases


@dataclass(frozen=True)
class PairActivations:
    """Residual activations at the last prompt position for both prompts of every case.

    Attributes:
        cases: The bank's cases, flips first.
        is_flip: Which cases are flips (the rest are non-flip controls).
        margin_orig: Yes-minus-no margin of each case's original prompt (recomputed).
        margin_para: Margin of each case's paraphrase.
        orig: Hook name → activations of the originals.
        para: Hook name → activations of the paraphrases.
    """

    cases: list[dict[str, Any]]
    is_flip: Bool[np.ndarray, " case"]
    margin_orig: Float[Tensor, " case"]
    margin_para: Float[Tensor, " case"]
    orig: dict[str, Float[Tensor, "case d_model"]]
    para: dict[str, Float[Tensor, "case d_model"]]

    @property
    def margin_shift(self) -> Float[Tensor, " case"]:
        """m_para − m_orig: how far the paraphrase moved the answer."""
        return self.margin_para - self.margin_orig

    def delta(self, hook: str) -> Float[Tensor, "case d_model"]:
        """x_para − x_orig at `hook`."""
        return self.para[hook] - self.orig[hook]

    @torch.no_grad()
    def features(self, sae: Any, hook: str) -> tuple[Float[Tensor, "case d_sae"], Float[Tensor, "case d_sae"]]:
        """SAE feature activations of the originals and of the paraphrases at `hook`."""
        return sae.encode(self.orig[hook].to(sae.dtype)), sae.encode(self.para[hook].to(sae.dtype))

    def feature_delta(self, sae: Any, hook: str) -> Float[Tensor, "case d_sae"]:
        """Δf = f(paraphrase) − f(original) at `hook`, per case."""
        f_orig, f_para = self.features(sae, hook)
        return f_para - f_orig

    def paraphrase_specs(self) -> list[PromptSpec]:
        """The paraphrase prompt of every case, in case order."""
        specs, _, paraphrases = pair_specs(self.cases)
        return [specs[i] for i in paraphrases]


def evidence_order(specs: Sequence[PromptSpec]) -> list[int]:
    """Indices of `specs` with each film's (or passage's) prompts side by side, in their order:
    batches in this order run a film's prefix, and its tower, once."""
    return sorted(range(len(specs)), key=lambda i: (specs[i].condition, str(specs[i].image), specs[i].context or ""))


@torch.no_grad()
@images_once
def collect_pairs(
    vlm: VLM,
    bank: Mapping[str, Any],
    hooks: Sequence[str],
    *,
    batch_size: int = 32,
    fast: bool = True,
    progress: bool = True,
) -> PairActivations:
    """Run every distinct prompt of the bank once, caching `hooks` at the last prompt position
    (a batch's prompts before the questions once per film; whole prompts with `fast=False`).

    Raises:
        FlipscopeError: the bank was made by another model, or its margins do not match this
            model's (beyond `MARGIN_TOLERANCE` logits).
    """
    check_flipbank_model(bank, vlm)
    for hook in hooks:
        check_activation_hook(vlm, hook)
    cases, is_flip = bank_cases(bank)
    if not is_flip.any():
        raise FlipscopeError(
            "the FlipBank has no flip cases, so there is no flip to explain (curation found none under its rules)"
        )
    specs, originals, paraphrases = pair_specs(cases)
    order = evidence_order(specs)
    margins, cached = [], {hook: [] for hook in hooks}
    for start in tqdm(range(0, len(order), batch_size), desc="caching pairs", disable=not progress):
        chunk = [specs[i] for i in order[start : start + batch_size]]
        runs = question_runs(vlm, chunk, hooks, fast=fast)
        margin, cache = runs.run_with_cache(hooks, last=True)
        margins.append(margin)
        for hook in hooks:
            cached[hook].append(cache[hook].float())
    back = torch.empty(len(order), dtype=torch.long)
    back[order] = torch.arange(len(order))
    margin = torch.cat(margins)[back]
    require_finite(margin, lambda i: f"the FlipBank prompt {specs[i].question!r}")
    acts = {hook: torch.cat(chunks)[back] for hook, chunks in cached.items()}
    o, p = torch.tensor(originals), torch.tensor(paraphrases)
    recorded = torch.tensor([[c["original_margin"], c["paraphrase_margin"]] for c in cases])
    gap = (torch.stack([margin[o], margin[p]], dim=1) - recorded).abs().max(dim=1).values
    worst = int(gap.argmax())
    if float(gap[worst]) > MARGIN_TOLERANCE:
        raise FlipscopeError(
            f"FlipBank case {cases[worst]['id']!r}: recorded margins {recorded[worst].tolist()} but this model gives "
            f"{[float(margin[o[worst]]), float(margin[p[worst]])]}; the bank was made with another model or setup"
        )
    return PairActivations(
        cases=cases,
        is_flip=is_flip,
        margin_orig=margin[o],
        margin_para=margin[p],
        orig={hook: a[o] for hook, a in acts.items()},
        para={hook: a[p] for hook, a in acts.items()},
    )
