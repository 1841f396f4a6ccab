"""Where the framing enters: causal tracing over layers and prompt positions, and the words that carry it.

A flip's **framing words** are the paraphrase's words that its original lacks ("suspected",
"confirm"). Corrupting them — their token embeddings (`blocks.0.hook_resid_pre`) replaced by the
mean embedding of the bank's question tokens — takes the wording out while every position stays
where it was, so the clean and corrupted runs line up position by position:

- **word attribution**: one framing word corrupted at a time; the share of the flip's margin
  shift it undoes, (m_para − m_word) / (m_para − m_orig);
- **tracing** (Meng et al.'s restoration): with every framing word corrupted, the clean
  paraphrase's residual stream (`hook_resid_pre` of layer L) is put back at one group of
  positions — the framing words, the rest of the question, or the last position — and the share
  of the framing's effect that returns is (m_restored − m_corrupt) / (m_para − m_corrupt).

Restoring the framing words restores everything at layer 0 and less once attention has moved the
wording on; restoring the last position restores little before that and everything after. The
layer where the last position takes over is where the framing enters the answer.

Every edit is inside the question or after it, so each batch's prompts before the questions (chat
header, image block) run once and its 2 + 3L + words forwards run on the questions alone
(`flipscope.model.suffix`); the neutral embedding is read from the questions asked without
evidence, which leaves their token embeddings as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.data.flipbank import check_flipbank_model
from flipscope.errors import FlipscopeError
from flipscope.experiments.pairs import case_spec
from flipscope.experiments.sites import entry_site
from flipscope.interventions.hooks import replace_where
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.model.suffix import FullRuns, batch_runs
from flipscope.model.vision_once import images_once
from flipscope.stats import bootstrap

__all__ = [
    "GROUPS",
    "UpstreamTrace",
    "Corrupted",
    "corrupted_paraphrases",
    "framing_word_shifts",
    "framing_words",
    "neutral_embedding",
    "trace_framing",
    "traced_flips",
    "traced_rows",
    "words_explain",
]

GROUPS = ("framing words", "rest of question", "last position")
WORD = re.compile(r"[\w'-]+")
MIN_EFFECT = 1e-3  # a corruption that moves the margin less than this explains nothing
MIN_EXPLAINED = 0.5  # the share of the flips' shift the framing words must undo (CI's lower end) to trace it
MIN_ENTRY = 0.5  # the share of the framing's effect the last position must carry (CI's lower end) at the entry


def framing_words(original: str, paraphrase: str) -> list[str]:
    """The paraphrase's words (lowercased) that the original lacks, in order, each once."""
    have = {w.lower() for w in WORD.findall(original)}
    seen: list[str] = []
    for word in (w.lower() for w in WORD.findall(paraphrase)):
        if word not in have and word not in seen:
            seen.append(word)
    return seen


def _token_words(tokenizer: Any, ids: list[int], text: str) -> list[str | None]:
    """The word (lowercased) each question token falls in, from the decoded prefix lengths."""
    spans = [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]
    out: list[str | None] = []
    previous = 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[: k + 1]))
        start, previous = previous, end
        word = next((w for a, b, w in spans if a < end and b > start), None)
        out.append(word)
    return out


@dataclass(frozen=True)
class UpstreamTrace:
    """The tracing of `trace_framing`.

    Attributes:
        layers: Layers whose `hook_resid_pre` was restored.
        restored: [case, layer, group] share of the framing's effect restored (`GROUPS` order).
        corrupted_share: Per case, the share of the flip's margin shift that corrupting every
            framing word undoes.
        effect: Per case, what corrupting every framing word moves its margin by, in logits
            (m_para − m_corrupt: the denominator of `restored`, so its shares mean little where
            this is small).
        words: Per case, framing word → share of the margin shift undone by corrupting it alone.
        case_ids: The traced flips.
        skipped: Flips not traced: no word of their own, or corrupting it moved nothing.
    """

    layers: list[int]
    restored: Float[np.ndarray, "case layer group"]
    corrupted_share: Float[np.ndarray, " case"]
    effect: Float[np.ndarray, " case"]
    words: list[dict[str, float]]
    case_ids: list[str]
    skipped: dict[str, int]

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """Mean share restored per layer and group, and per framing word, with bootstrap CIs
        (no profile when no flip was traced)."""
        profile = (
            []
            if not len(self.case_ids)
            else [
                {
                    "layer": layer,
                    **{g: bootstrap(self.restored[:, i, j], seed=seed).to_dict() for j, g in enumerate(GROUPS)},
                }
                for i, layer in enumerate(self.layers)
            ]
        )
        by_word: dict[str, list[float]] = {}
        for case in self.words:
            for word, share in case.items():
                by_word.setdefault(word, []).append(share)
        entry = self.entry_layer(seed)
        words = {
            w: bootstrap(np.array(v), seed=seed).to_dict()
            for w, v in sorted(by_word.items(), key=lambda kv: -float(np.mean(kv[1])))
        }
        return {
            "n_cases": len(self.case_ids),
            "skipped": self.skipped,
            "groups": list(GROUPS),
            "layers": list(self.layers),
            "corrupted_share": bootstrap(self.corrupted_share, seed=seed).to_dict() if len(self.case_ids) else None,
            "effect": bootstrap(self.effect, seed=seed).to_dict() if len(self.case_ids) else None,
            "profile": profile,
            "words": words,
            "explained": self.explained(seed),
            "entry_layer": entry,
            "entry_site": None if entry is None else entry_site(entry),
        }

    def explained(self, seed: int = 0) -> bool:
        """Whether corrupting the framing words explains the flips' shift: the lower end of the
        CI of the share it undoes is at least `MIN_EXPLAINED`. Where the words explain less, the
        tracing restores an effect that is not the flip, and no entry layer is named."""
        return words_explain(self.corrupted_share, seed)

    def entry_layer(self, seed: int = 0) -> int | None:
        """The first layer whose last position carries at least half the framing's effect, by the
        lower end of its CI over the traced flips (as `explained` judges the words): a layer where
        some flips' answer position carries it and others' does not is not named. None when no
        flip was traced, the framing words do not explain the shift, or no layer carries half."""
        if not self.explained(seed):
            return None
        last = self.restored[:, :, GROUPS.index("last position")]
        return next(
            (layer for i, layer in enumerate(self.layers) if bootstrap(last[:, i], seed=seed).low >= MIN_ENTRY), None
        )


def _masks(vlm: VLM, cases: Sequence[Mapping[str, Any]], specs: list[PromptSpec], inputs: Any):
    """Per row: each framing word's token mask (words with no token left out), and the masks of
    the three `GROUPS`."""
    question = vlm.prompts.question_mask(specs, inputs)
    tokenizer = vlm.prompts.tokenizer
    word_masks = []
    for row, case in enumerate(cases):
        positions = torch.nonzero(question[row]).flatten()
        ids = inputs.input_ids[row, positions].tolist()
        owner = _token_words(tokenizer, ids, case["paraphrase"])
        words = framing_words(case["original"], case["paraphrase"])
        masks = {}
        for word in words:
            mask = torch.zeros_like(question[row])
            mask[positions[[i for i, w in enumerate(owner) if w == word]]] = True
            if mask.any():
                masks[word] = mask
        word_masks.append(masks)
    framing = torch.stack([torch.stack(list(m.values())).any(0) if m else torch.zeros_like(question[0])
                           for m in word_masks])  # fmt: skip
    last = torch.zeros_like(question)
    last[:, -1] = True
    groups = torch.stack([framing, question & ~framing, last])  # [group, batch, pos]
    return word_masks, groups


@torch.no_grad()
def neutral_embedding(vlm: VLM, cases: Sequence[Mapping[str, Any]], batch_size: int) -> Float[Tensor, " d_model"]:
    """Mean `blocks.0.hook_resid_pre` over the question tokens of the bank's original questions
    (their token embeddings, which no image or passage before them changes: asked without one)."""
    specs = [PromptSpec(question=c["original"], condition="none") for c in cases]
    total, count = None, 0
    for start in range(0, len(specs), batch_size):
        chunk = specs[start : start + batch_size]
        inputs = vlm.prompts.build(chunk)
        cache = vlm.cache_activations(inputs, names_filter="blocks.0.hook_resid_pre")
        x = cache["blocks.0.hook_resid_pre"][vlm.prompts.question_mask(chunk, inputs)].float()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += len(x)
    return total / count


class Corrupted(NamedTuple):
    """One batch of paraphrases as the trace corrupts them (`corrupted_paraphrases`)."""

    runs: FullRuns  # its forwards (with `fast`, on the questions alone where sound)
    word_masks: list[dict[str, Tensor]]  # per row, each framing word's tokens (at the batch's positions)
    groups: Bool[Tensor, "group batch run_pos"]  # the `GROUPS`' masks at the runs' positions
    fill: Float[Tensor, "batch run_pos d_model"]  # the neutral embedding at the runs' positions
    at_batch: Bool[Tensor, "group batch pos"]  # the `GROUPS`' masks at the batch's positions


def corrupted_paraphrases(
    vlm: VLM, cases: Sequence[Mapping[str, Any]], neutral: Float[Tensor, " d_model"], fast: bool = True
) -> Corrupted:
    """One batch of the cases' paraphrases as the trace corrupts them: its runs (with `fast`, the
    prompts before the questions once where that is sound: `flipscope.model.suffix`), each row's
    framing-word masks (at the batch's positions; `runs.to_run` moves them), the `GROUPS`'
    position masks and the neutral embedding at the runs' positions, and the masks again at the
    batch's (for a read of whole prompts)."""
    specs = [case_spec(c, c["paraphrase"]) for c in cases]
    inputs = vlm.prompts.build(specs)
    word_masks, groups = _masks(vlm, cases, specs, inputs)
    runs = batch_runs(vlm, inputs, groups.any(0), fast=fast)
    fill = runs.to_run(neutral.expand(*inputs.input_ids.shape, -1))
    return Corrupted(runs, word_masks, torch.stack([runs.to_run(g) for g in groups]), fill, groups)


@torch.no_grad()
def _trace_batch(vlm: VLM, cases, layers, neutral, skipped: dict[str, int], fast: bool) -> list[tuple]:
    """The traced rows of one batch of flips, `(id, restored [layer, group], share undone, word
    → share, effect)`, counting the flips it skips in `skipped`."""
    runs, word_masks, groups, fill, _ = corrupted_paraphrases(vlm, cases, neutral, fast)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    m_para, clean = runs.run_with_cache(hooks)
    corrupt = ("blocks.0.hook_resid_pre", replace_where(fill, groups[0]))
    m_corrupt = runs.margins([corrupt])
    m_orig = torch.tensor([c["original_margin"] for c in cases])
    restored = torch.empty(len(cases), len(layers), len(GROUPS))
    for i, hook in enumerate(hooks):
        for g in range(len(GROUPS)):
            m = runs.margins([corrupt, (hook, replace_where(clean[hook], groups[g]))])
            restored[:, i, g] = (m - m_corrupt) / (m_para - m_corrupt)
    undone = (m_para - m_corrupt) / (m_para - m_orig)
    words: list[dict[str, float]] = [{} for _ in cases]
    nothing = torch.zeros(runs.inputs.input_ids.shape[1], dtype=torch.bool)
    for k in range(max((len(m) for m in word_masks), default=0)):  # the k-th framing word of every row at once
        kth = [list(m)[k] if k < len(m) else None for m in word_masks]
        mask = runs.to_run(torch.stack([word_masks[r][w] if w else nothing for r, w in enumerate(kth)]))
        m_word = runs.margins([("blocks.0.hook_resid_pre", replace_where(fill, mask))])
        for r, w in enumerate(kth):
            if w:
                words[r][w] = float((m_para[r] - m_word[r]) / (m_para[r] - m_orig[r]))
    return [
        (cases[r]["id"], restored[r].numpy(), float(undone[r]), words[r], float(m_para[r] - m_corrupt[r]))
        for r in traced_rows(word_masks, m_para - m_corrupt, skipped)
    ]


def words_explain(corrupted_share: Float[np.ndarray, " case"], seed: int = 0) -> bool:
    """Whether corrupting the framing words undoes at least `MIN_EXPLAINED` of the traced flips'
    shift, by the CI's lower end (False with no flip traced): the bar before a layer or head is named."""
    return bool(len(corrupted_share)) and bool(bootstrap(corrupted_share, seed=seed).low >= MIN_EXPLAINED)


def traced_rows(word_masks: Sequence[Mapping[str, Any]], effect: Float[Tensor, " batch"], skipped: dict[str, int]):
    """The rows of a batch a trace keeps: those with a framing word whose corruption moved the
    margin (`effect`, m_para − m_corrupt) by at least `MIN_EFFECT`; the others counted in `skipped`."""
    kept = []
    for r, masks in enumerate(word_masks):
        if not masks:
            skipped["no framing word"] += 1
        elif abs(float(effect[r])) < MIN_EFFECT:
            skipped["corruption moved nothing"] += 1
        else:
            kept.append(r)
    return kept


def traced_flips(vlm: VLM, bank: Mapping[str, Any], max_cases: int | None) -> list[Mapping[str, Any]]:
    """The bank's first `max_cases` flips (all with None), checked to be the model's.

    Raises:
        FlipscopeError: the bank was made by another model, or has no flips.
    """
    check_flipbank_model(bank, vlm)
    flips = list(bank["flips"])[:max_cases]
    if not flips:
        raise FlipscopeError("the FlipBank has no flips to trace")
    return flips


@images_once
def trace_framing(
    vlm: VLM,
    bank: Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    max_cases: int | None = 64,
    batch_size: int = 16,
    progress: bool = True,
    fast: bool = True,
) -> UpstreamTrace:
    """Word attribution and layer × position tracing (module docstring) over the bank's first
    `max_cases` flips (all with None), at `layers` (default all). Each batch's prompts before the
    questions run once, its forwards on the questions alone (`flipscope.model.suffix`); with
    `fast=False` every forward runs the whole prompt (the reference that path is tested against).

    Raises:
        FlipscopeError: the bank was made by another model, or has no flips.
    """
    flips = traced_flips(vlm, bank, max_cases)
    layer_ids = list(range(vlm.n_layers)) if layers is None else list(layers)
    neutral = neutral_embedding(vlm, flips, batch_size)
    skipped = {"no framing word": 0, "corruption moved nothing": 0}
    rows = []
    for start in tqdm(range(0, len(flips), batch_size), desc="tracing the framing", disable=not progress):
        rows += _trace_batch(vlm, flips[start : start + batch_size], layer_ids, neutral, skipped, fast)
    return UpstreamTrace(
        layers=layer_ids,
        restored=np.stack([r[1] for r in rows]) if rows else np.zeros((0, len(layer_ids), len(GROUPS))),
        corrupted_share=np.array([r[2] for r in rows]),
        effect=np.array([r[4] for r in rows]),
        words=[r[3] for r in rows],
        case_ids=[r[0] for r in rows],
        skipped=skipped,
    )


@torch.no_grad()
@images_once
def framing_word_shifts(
    vlm: VLM, bank: Mapping[str, Any], *, which: str = "controls", batch_size: int = 16, fast: bool = True
) -> dict[str, float]:
    """|m(paraphrase) − m(its framing words corrupted)| for each of the bank's `which` cases
    (`controls` or `flips`), by case id, corrupted as the trace corrupts them: how far the wording
    moves each prompt's margin. On the same-family non-flips it is the bound a patch that removes
    the framing may move them by (`flipscope.experiments.control_bound`); cases without a framing
    word of their own are left out. With `fast`, each batch's prompts before the questions run
    once, as in the trace; else whole prompts.

    Raises:
        FlipscopeError: the bank was made by another model, or has no such cases.
    """
    check_flipbank_model(bank, vlm)
    cases = list(bank[which])
    if not cases:
        raise FlipscopeError(f"the FlipBank has no {which}")
    neutral = neutral_embedding(vlm, cases, batch_size)
    out: dict[str, float] = {}
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        runs, _, groups, fill, _ = corrupted_paraphrases(vlm, batch, neutral, fast)
        m_para = runs.margins()
        m_corrupt = runs.margins([("blocks.0.hook_resid_pre", replace_where(fill, groups[0]))])
        moved = (m_para - m_corrupt).abs().double().cpu().tolist()
        has_words = groups[0].any(-1).tolist()
        out.update((case["id"], m) for case, m, has in zip(batch, moved, has_words, strict=True) if has)
    return out
