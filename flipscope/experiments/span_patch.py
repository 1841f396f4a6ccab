"""Patching features over a span of the prompt, not only at its last position.

An original and its paraphrase share every token before the question (chat header, image block),
so at any layer their activations there are the same and nothing needs moving. Their questions'
tokens do not line up (the wordings differ in length), so there each paraphrase token's features
are moved to the original's mean over its own question. The template's tail after the question
(end of turn, the model turn's header, the last position among them) lines up exactly, so there
each position's features are moved to the original's value at the same place: the last position
alone is then the paper's delta patch, and `"all"` (question and tail) contains it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.interventions.hooks import shift_features_hook
from flipscope.model.protocol import VLM
from flipscope.sae.encode import feature_encoder

__all__ = ["SPANS", "SpanReference", "span_hook", "span_reference"]

SPANS = ("question", "all")


@dataclass(frozen=True)
class SpanReference:
    """What the patched features are moved to, per original prompt.

    Attributes:
        question: The features' mean over the original's question tokens.
        tail: Their values at each position of the template's tail after the question.
    """

    question: Float[Tensor, "prompt n_features"]
    tail: Float[Tensor, "prompt tail n_features"]

    def take(self, rows: Sequence[int]) -> SpanReference:
        index = torch.tensor(list(rows), dtype=torch.long)
        return SpanReference(self.question[index], self.tail[index])


def tail_length(vlm: VLM) -> int:
    """Tokens of the chat template after the question (the same in every prompt of the model)."""
    return vlm.prompts.template_lengths(with_image=False)[1]


@torch.no_grad()
def span_reference(
    vlm: VLM, sae: Any, hook: str, specs: Sequence[Any], features: Sequence[int], batch_size: int
) -> SpanReference:
    """Run `specs` (the originals) and read `features` over their question and their tail."""
    encode, tail = feature_encoder(sae, features), tail_length(vlm)
    means, tails = [], []
    for start in range(0, len(specs), batch_size):
        chunk = list(specs[start : start + batch_size])
        inputs = vlm.prompts.build(chunk)
        feats = encode(vlm.cache_activations(inputs, names_filter=hook)[hook].to(sae.dtype)).float()
        mask = vlm.prompts.question_mask(chunk, inputs).to(feats.device)
        means.append((feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        tails.append(feats[:, feats.shape[1] - tail :])
    return SpanReference(torch.cat(means).cpu(), torch.cat(tails).cpu())


def span_targets(
    reference: SpanReference, question: Bool[Tensor, "batch pos"], span: str
) -> tuple[Float[Tensor, "batch pos n_features"], Bool[Tensor, "batch pos"]]:
    """Per position of a left-padded paraphrase batch: the features' target and whether to move them."""
    if span not in SPANS:
        raise FlipscopeError(f"span {span!r} is unknown; expected one of {SPANS}")
    batch, width = question.shape
    tail = reference.tail.shape[1]
    target = reference.question[:, None, :].expand(batch, width, -1).clone()
    mask = question.clone()
    if span == "all" and tail:
        target[:, width - tail :] = reference.tail
        mask[:, width - tail :] = True
    return target, mask


def span_hook(vlm: VLM, sae: Any, features: Sequence[int], reference: SpanReference, specs: Sequence[Any],
              inputs: Any, span: str):  # fmt: skip
    """The hook that moves `features` over `span` of the paraphrase batch `inputs` (built from
    `specs`) to `reference` (one row per prompt of the batch)."""
    question = vlm.prompts.question_mask(list(specs), inputs)
    target, mask = span_targets(reference, question, span)
    return shift_features_hook(sae, features, target, mask)
