"""Which attention heads move the framing to the answer position: the trace, head by head.

The trace (`flipscope.experiments.upstream`) finds the layer from whose input on the last position
carries the framing; only attention moves information between positions, so heads before it read
the framing words into the answer position. With every framing word corrupted as the trace
corrupts them, for each layer L and head h, at the paraphrase's last position only:

- **restored** (denoising: is the head enough?): the clean run's output of head h (its slice of
  `blocks.L.attn.hook_z`, the input of `o_proj`) put into the corrupted run; the share of the
  framing's effect that returns, (m − m_corrupt) / (m_para − m_corrupt);
- **removed** (noising: is the head needed?): the corrupted run's output of head h put into the
  clean run; the share that goes, (m_para − m) / (m_para − m_corrupt);
- **all heads** of layer L restored at once: exactly its `hook_attn_out` at the last position
  (`o_proj` and the post-attention norm see the same input), the layer's whole share.

Beside them, where each head looks from the last position (`LOOKS`): its attention weights'
mass on the framing words, the rest of the question, the image's soft tokens and the rest of the
prompt (the chat template, a text model's passage), from one whole-prompt forward a batch with the
patterns read (`blocks.L.attn.hook_pattern`). Attention is where a head reads, not what it writes: the shares
above say whether it matters, the pattern says which words it reads.

Heads are not additive (the post-attention norm and later layers mix them), so a head "carries"
the framing only when it is both enough and needed (`carriers`); a layer whose attention restores
half of the effect with no such head spreads it over several. Every edit is at the last position,
so each batch's prompts before the questions run once (`flipscope.model.suffix`), as in the trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from flipscope.data.questions import Question
from flipscope.errors import FlipscopeError
from flipscope.experiments.upstream import (
    corrupted_paraphrases,
    neutral_embedding,
    traced_flips,
    traced_rows,
    words_explain,
)
from flipscope.interventions.edited import HeadAblatedVLM
from flipscope.interventions.hooks import replace_head_at, replace_where
from flipscope.model.caching import Recorder
from flipscope.model.families import image_token_mask
from flipscope.model.hook_names import attention_heads, attn_pattern, attn_z
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.model.vision_once import images_once
from flipscope.stats import bootstrap

__all__ = [
    "LOOKS",
    "MIN_CARRIED",
    "HeadTrace",
    "carrier_ablations",
    "carriers",
    "head_ablations",
    "head_means",
    "heads_before_entry",
    "trace_heads",
]

MIN_CARRIED = 0.5  # the CI's lower end of both shares for a head to carry the framing
LOOKS = ("framing words", "rest of question", "image", "rest of prompt")


@dataclass(frozen=True)
class HeadTrace:
    """The head-level tracing of `trace_heads`.

    Attributes:
        layers: Layers whose heads were traced.
        n_heads: Query heads per layer.
        restored: [case, layer, head] share of the framing's effect one clean head brings back.
        removed: [case, layer, head] share one corrupted head takes away from the clean run.
        whole: [case, layer] share all of a layer's heads bring back together.
        looks: [case, layer, head, where] each head's attention from the last position on each of `LOOKS`.
        word_share: Per case, the framing words' share of the question's tokens.
        corrupted_share: Per case, the share of the flip's margin shift corrupting the words undoes.
        case_ids: The traced flips.
        skipped: Flips not traced: no word of their own, or corrupting it moved nothing.
    """

    layers: list[int]
    n_heads: int
    restored: Float[np.ndarray, "case layer head"]
    removed: Float[np.ndarray, "case layer head"]
    whole: Float[np.ndarray, "case layer"]
    looks: Float[np.ndarray, "case layer head where"]
    word_share: Float[np.ndarray, " case"]
    corrupted_share: Float[np.ndarray, " case"]
    case_ids: list[str]
    skipped: dict[str, int]

    def explained(self, seed: int = 0) -> bool:
        """Whether corrupting the framing words undoes at least `upstream.MIN_EXPLAINED` of the flips'
        shift (the CI's lower end), as the trace requires before it names a layer."""
        return words_explain(self.corrupted_share, seed)

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """Per layer, the whole attention's share and each head's two shares with bootstrap CIs;
        the heads that carry the framing (`carriers`), and whether the words explain the shift."""
        n = len(self.case_ids)
        layers = [
            {
                "layer": layer,
                "all heads": bootstrap(self.whole[:, i], seed=seed).to_dict() if n else None,
                "heads": [
                    {
                        "head": h,
                        "restored": bootstrap(self.restored[:, i, h], seed=seed).to_dict(),
                        "removed": bootstrap(self.removed[:, i, h], seed=seed).to_dict(),
                        "looks": self._looks(i, h, seed),
                    }
                    for h in range(self.n_heads)
                ]
                if n
                else [],
            }
            for i, layer in enumerate(self.layers)
        ]
        explained = self.explained(seed)
        return {
            "n_cases": n,
            "skipped": self.skipped,
            "n_heads": self.n_heads,
            "bar": MIN_CARRIED,
            "corrupted_share": bootstrap(self.corrupted_share, seed=seed).to_dict() if n else None,
            "word_share": bootstrap(self.word_share, seed=seed).to_dict() if n else None,
            "explained": explained,
            "layers": layers,
            "carriers": carriers(layers) if explained else [],
        }

    def _looks(self, i: int, h: int, seed: int) -> dict[str, Any]:
        """Head h of the i-th layer: its mass on each of `LOOKS`, and the framing words' share of
        what it gives the question beside their share of its tokens (`favours`: the paired
        difference, over the flips where it gives the question any attention)."""
        mass = self.looks[:, i, h]
        on_question = mass[:, 0] + mass[:, 1]
        seen = on_question > 1e-6
        share = mass[seen, 0] / on_question[seen]
        return {
            **{where: bootstrap(mass[:, k], seed=seed).to_dict() for k, where in enumerate(LOOKS)},
            "of the question": bootstrap(share, seed=seed).to_dict() if seen.any() else None,
            "favours": bootstrap(share - self.word_share[seen], seed=seed).to_dict() if seen.any() else None,
        }


def carriers(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The heads both enough and needed: restoring one alone brings back, and corrupting it alone
    takes away, at least `MIN_CARRIED` of the framing's effect (each CI's lower end)."""
    return [
        {"layer": row["layer"], **head}
        for row in layers
        for head in row["heads"]
        if head["restored"]["low"] >= MIN_CARRIED and head["removed"]["low"] >= MIN_CARRIED
    ]


class _Row(NamedTuple):
    case_id: str
    restored: Float[np.ndarray, "layer head"]
    removed: Float[np.ndarray, "layer head"]
    whole: Float[np.ndarray, " layer"]
    looks: Float[np.ndarray, "layer head where"]
    word_share: float
    undone: float


@torch.no_grad()
def _head_batch(vlm: VLM, cases, layers: list[int], n_heads: int, neutral, skipped: dict[str, int], fast: bool):
    """The traced rows of one batch of flips (`_Row`), counting the flips it skips in `skipped`."""
    runs, word_masks, groups, fill, at_batch = corrupted_paraphrases(vlm, cases, neutral, fast)
    hooks = [attn_z(layer) for layer in layers]
    corrupt = ("blocks.0.hook_resid_pre", replace_where(fill, groups[0]))
    at = runs.last_positions
    m_para, clean = runs.run_with_cache(hooks, last=True)
    recorder = Recorder(hooks, at)
    m_corrupt = runs.margins([corrupt, *recorder.hooks(hooks)])
    dirty = recorder.cache
    width = clean[hooks[0]].shape[-1] // n_heads
    effect = m_para - m_corrupt
    restored = torch.empty(len(cases), len(layers), n_heads)
    removed = torch.empty(len(cases), len(layers), n_heads)
    whole = torch.empty(len(cases), len(layers))
    every = slice(0, n_heads * width)
    for i, hook in enumerate(hooks):
        whole[:, i] = (runs.margins([corrupt, (hook, replace_head_at(clean[hook], at, every))]) - m_corrupt) / effect
        for h in range(n_heads):
            one = slice(h * width, (h + 1) * width)
            m_back = runs.margins([corrupt, (hook, replace_head_at(clean[hook], at, one))])
            m_out = runs.margins([(hook, replace_head_at(dirty[hook], at, one))])
            restored[:, i, h] = (m_back - m_corrupt) / effect
            removed[:, i, h] = (m_para - m_out) / effect
    looks = _looks(vlm, runs.inputs, at_batch, layers)
    question = at_batch[0] | at_batch[1]
    word_share = at_batch[0].sum(1) / question.sum(1).clamp(min=1)
    undone = effect / (m_para - torch.tensor([c["original_margin"] for c in cases]))
    return [
        _Row(
            cases[r]["id"],
            restored[r].numpy(),
            removed[r].numpy(),
            whole[r].numpy(),
            looks[r].numpy(),
            float(word_share[r]),
            float(undone[r]),
        )
        for r in traced_rows(word_masks, effect, skipped)
    ]


def _looks(
    vlm: VLM, inputs: Any, groups: Bool[torch.Tensor, "group batch pos"], layers: list[int]
) -> Float[torch.Tensor, "batch layer head where"]:
    """Each head's attention weights from the last position (one whole-prompt forward, the
    patterns read), summed over each of `LOOKS` (`groups`: the trace's `GROUPS` at these positions)."""
    names = [attn_pattern(layer) for layer in layers]
    patterns = vlm.cache_activations(inputs, names_filter=names, positions="last")  # [batch head key] each
    framing, rest = groups[0], groups[1]
    question = framing | rest
    real = inputs.attention_mask.bool()
    image = image_token_mask(vlm.hf_model, inputs.input_ids) & real
    where = torch.stack([framing, rest, image, real & ~question & ~image], -1).float()  # [batch key where]
    return torch.stack([torch.einsum("bhk,bkw->bhw", patterns[name].float(), where) for name in names], 1)


@images_once
def trace_heads(
    vlm: VLM,
    bank: Mapping[str, Any],
    *,
    layers: Sequence[int] | None = None,
    max_cases: int | None = 64,
    batch_size: int = 16,
    progress: bool = True,
    fast: bool = True,
) -> HeadTrace:
    """Restore and remove each head of `layers` (default all) at the last position, over the
    bank's first `max_cases` flips (all with None): 2 + L × (2H + 1) forwards a batch, on the
    questions alone where `flipscope.model.suffix` allows (with `fast=False`, whole prompts), and
    one whole-prompt forward, to the last of `layers`, that reads where each head looks.

    Raises:
        FlipscopeError: the bank was made by another model, has no flips, or a layer is out of range.
    """
    flips = traced_flips(vlm, bank, max_cases)
    layer_ids = list(range(vlm.n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layer_ids if not 0 <= layer < vlm.n_layers]
    if bad or not layer_ids:
        raise FlipscopeError(f"layers {bad or '[]'}: the model has layers 0..{vlm.n_layers - 1}")
    n_heads, _ = attention_heads(vlm.hf_model)
    neutral = neutral_embedding(vlm, flips, batch_size)
    skipped = {"no framing word": 0, "corruption moved nothing": 0}
    rows = []
    for start in tqdm(range(0, len(flips), batch_size), desc="tracing heads", disable=not progress):
        rows += _head_batch(vlm, flips[start : start + batch_size], layer_ids, n_heads, neutral, skipped, fast)
    empty = np.zeros((0, len(layer_ids), n_heads))
    return HeadTrace(
        layers=layer_ids,
        n_heads=n_heads,
        restored=np.stack([r.restored for r in rows]) if rows else empty,
        removed=np.stack([r.removed for r in rows]) if rows else empty,
        whole=np.stack([r.whole for r in rows]) if rows else empty[..., 0],
        looks=np.stack([r.looks for r in rows]) if rows else np.zeros((0, len(layer_ids), n_heads, len(LOOKS))),
        word_share=np.array([r.word_share for r in rows]),
        corrupted_share=np.array([r.undone for r in rows]),
        case_ids=[r.case_id for r in rows],
        skipped=skipped,
    )


def heads_before_entry(
    vlm: VLM, bank: Mapping[str, Any], trace: Mapping[str, Any], layers: Sequence[int] | None = None, *,
    seed: int = 0, **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """`trace_heads`' summary at `layers`, by default those before the entry layer the trace
    (`UpstreamTrace.summary()`) names, whose attention moved the framing to the answer position,
    and every layer where it names none; `kwargs` go to `trace_heads`. Where the framing words do
    not explain the flips' shift no head can be named, so without `layers` none is traced."""
    if layers is None and not trace.get("explained"):
        return {
            "n_cases": trace.get("n_cases", 0), "skipped": trace.get("skipped", {}),
            "n_heads": attention_heads(vlm.hf_model)[0], "bar": MIN_CARRIED,
            "corrupted_share": trace.get("corrupted_share"), "word_share": None, "explained": False,
            "layers": [], "carriers": [],
        }  # fmt: skip
    entry = trace.get("entry_layer")
    if layers is None and entry:
        layers = list(range(entry))
    return trace_heads(vlm, bank, layers=layers, **kwargs).summary(seed=seed)


@torch.no_grad()
@images_once
def head_means(
    vlm: VLM, questions: Sequence[Question], layer: int, *, batch_size: int = 16
) -> Float[torch.Tensor, " width"]:
    """Layer `layer`'s `attn.hook_z` averaged over every real position of the questions' prompts
    (each wording, with its image or passage): the values a mean ablation puts in a head's place."""
    if not questions:
        raise FlipscopeError("head means need at least one question")
    hook = attn_z(layer)
    specs = [
        PromptSpec(question=text, image=q.image)
        if q.image is not None
        else PromptSpec(question=text, condition="context", context=q.context)
        for q in questions
        for text in q.prompts
    ]
    total, count = None, 0
    for start in range(0, len(specs), batch_size):
        inputs = vlm.prompts.build(specs[start : start + batch_size])
        z = vlm.cache_activations(inputs, names_filter=hook)[hook][inputs.attention_mask.bool()].double()
        total, count = (z.sum(0) if total is None else total + z.sum(0)), count + len(z)
    return (total / count).float()


def head_ablations(
    vlm: Any, heads: Sequence[tuple[int, int]], questions: Sequence[Question]
) -> dict[str, HeadAblatedVLM]:
    """One `HeadAblatedVLM` per `(layer, head)`, named `head-L.h`, the head replaced by its mean
    over `questions` (`head_means`, once per layer)."""
    means: dict[int, torch.Tensor] = {}
    out: dict[str, HeadAblatedVLM] = {}
    for layer, head in heads:
        if layer not in means:
            means[layer] = head_means(vlm, questions, layer)
        out[f"head-{layer}.{head}"] = HeadAblatedVLM(vlm, layer, [head], means[layer])
    return out


def carrier_ablations(vlm: Any, heads: Mapping[str, Any], questions: Sequence[Question]) -> dict[str, HeadAblatedVLM]:
    """`head_ablations` of the heads the head trace (`HeadTrace.summary()`) says carry the framing:
    switching off the heads the trace names, to be evaluated beside the other cures."""
    return head_ablations(vlm, [(int(c["layer"]), int(c["head"])) for c in heads.get("carriers") or []], questions)
