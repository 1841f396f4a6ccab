"""Scoring many prompts that share an image with the shared part computed once.

Gemma 3 puts the image before the question: every paraphrase of a question about one film
starts with the same tokens (chat header, image block, the newlines after it). Image tokens
attend bidirectionally only within their block and never to later tokens, so the keys and
values of that prefix do not depend on what follows. `score_shared_prefix` runs the prefix once
(the vision tower included), then all suffixes as one right-padded batch on the prefix's key/value
cache (each layer's copied for the batch only while that layer attends: `shared_rows`), and reads
only each row's last real token, through the answer tokens' rows of the unembedding alone (at a
262k vocabulary the full projection costs ~1.3 GFLOP a row). It equals the plain forward of each
full prompt up to float reassociation (tested to 1e-4).

`score_last_token` serves patching sweeps: every position but the last runs once per prompt,
the last once per variant of an edit there. All forwards go through `HookedVLM.hf_forward` /
`hf_hidden`, so an edited model's edits apply once on every path; `HookedVLM` exposes these as
methods of the same names.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from flipscope.errors import FlipscopeError
from flipscope.model.caching import StopForward
from flipscope.model.prompts import ModelInputs, PromptBuilder, PromptSpec

__all__ = [
    "Prefix",
    "prefix_cache",
    "run_prefix",
    "score_last_token",
    "score_shared_prefix",
    "shared_rows",
    "suffix_last_hidden",
    "template_prefix_length",
]


def template_prefix_length(builder: PromptBuilder, with_image: bool) -> int:
    """Tokens of the chat template before the question (header, image block and its newlines)."""
    return builder.template_lengths(with_image)[0]


@dataclass(frozen=True)
class Prefix:
    """The key/value cache of a prompt prefix and its length in tokens."""

    cache: Any
    length: int


@torch.no_grad()
def run_prefix(model: Any, builder: PromptBuilder, spec: PromptSpec, length: int | None = None) -> Prefix:
    """Run the first `length` tokens of `spec` (default: the template prefix; its image
    included) once, keeping their key/value cache."""
    length = builder.prefix_length(spec) if length is None else length
    return Prefix(prefix_cache(model, builder.build([spec]), torch.arange(length)[None]), length)


def prefix_cache(model: Any, inputs: ModelInputs, columns: Int[Tensor, "batch width"], until: Any = None) -> Any:
    """The key/value cache of each row's tokens at `columns` (a prefix: the same columns after it
    run on the cache), its images through the tower, with the model's edits and no hooks; with
    `until` (a stopping `caching.Recorder`), that recorder's hooks on and the forward ended once it
    holds them, so the cache holds only the layers before that point."""
    prefix = inputs.columns(columns).to(model.device, model.dtype)
    if until is None:
        return model.hf_hidden(**prefix.as_kwargs(), use_cache=True).past_key_values
    cache = DynamicCache(config=model.hf_model.config.get_text_config())
    with model.hooks(fwd_hooks=until.hooks(model.hook_dict)), suppress(StopForward):
        model.hf_hidden(**prefix.as_kwargs(), past_key_values=cache, use_cache=True)
    return cache


def shared_rows(cache: Any, rows: int | Int[Tensor, " row"]) -> Any:
    """A view of `cache` that serves its row `rows[i]` as row i of one forward (`rows` an int k:
    k consecutive copies of each row) and is never written: each layer's keys and values are
    copied for the rows only while that layer attends, then dropped. HF's `batch_repeat_interleave`
    (on a deep copy, to keep `cache`) holds every layer's copies through the whole forward: ~42 MB
    a row for a 300-token MedGemma prompt. A cache whose layers are not HF's dynamic ones is
    copied that way instead."""
    if isinstance(rows, int):
        rows = torch.arange(cache.layers[0].keys.shape[0]).repeat_interleave(rows)
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers) or any(
        getattr(layer, "record_past", False) for layer in cache.layers
    ):
        copied = copy.deepcopy(cache)
        copied.batch_select_indices(rows.to(cache.layers[0].keys.device))
        return copied
    view = copy.copy(cache)

    def update(keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        layer = cache.layers[layer_idx]  # what the layer's own update would concatenate to, left as it is
        index = rows.to(layer.keys.device)
        return (torch.cat([layer.keys.index_select(0, index), keys], dim=-2),
                torch.cat([layer.values.index_select(0, index), values], dim=-2))  # fmt: skip

    view.update = update
    return view


@torch.no_grad()
def score_shared_prefix(
    model: Any, builder: PromptBuilder, specs: Sequence[PromptSpec], batch_size: int = 32, prefix: Prefix | None = None
) -> Float[Tensor, " batch"]:
    """Margins of `specs`, which must show the same image (or none): the prefix is run once (or
    taken from `prefix`, e.g. the blank's, computed once per run), the suffixes in batches of
    `batch_size` on copies of its cache.

    Raises:
        FlipscopeError: the prompts do not share their image slot.
    """
    if not specs:
        raise FlipscopeError("no prompts to score")
    conditions = {s.condition for s in specs}
    if len(conditions) != 1:
        raise FlipscopeError(f"prompts sharing a prefix must share one image condition, got {sorted(conditions)}")
    prefix = prefix or run_prefix(model, builder, specs[0])
    ids = [builder.tokens(s)["input_ids"].reshape(-1) for s in specs]
    pad = int(builder.tokenizer.pad_token_id)
    margins = [
        _score_suffixes(model, prefix, [s[prefix.length :] for s in ids[i : i + batch_size]], pad)
        for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(margins)


def _score_suffixes(model: Any, prefix: Prefix, suffixes: list[Tensor], pad: int) -> Float[Tensor, " batch"]:
    """Margins of right-padded `suffixes` on copies of `prefix`'s cache, read at each row's last
    real token (only those hidden states are unembedded)."""
    lengths = torch.tensor([len(s) for s in suffixes])
    width = int(lengths.max())
    batch = torch.full((len(suffixes), width), pad, dtype=torch.long)
    for i, suffix in enumerate(suffixes):
        batch[i, : len(suffix)] = suffix
    keep = torch.arange(width) < lengths[:, None]
    return model.answer_margin(suffix_last_hidden(model, prefix.cache, prefix.length, batch, keep, len(suffixes)))


def suffix_last_hidden(
    model: Any, cache: Any, length: int, input_ids: Int[Tensor, "batch suffix"], keep: Bool[Tensor, "batch suffix"],
    rows: int | Int[Tensor, " batch"] = 1,
) -> Float[Tensor, "batch d_model"]:  # fmt: skip
    """Final hidden states at each row's last real token of right-padded suffixes (`keep` marks
    their real tokens) run on `cache`, a prefix of `length` tokens: row `rows[i]` of it for suffix
    i, or (`rows` an int) each of its rows for that many consecutive suffixes. The cache is never
    written."""
    device, n = model.device, len(input_ids)
    width = input_ids.shape[1]
    mask = torch.cat([torch.ones((n, length), dtype=torch.long), keep.long()], 1)
    hidden = model.hf_hidden(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=(length + torch.arange(width)).expand(n, width).to(device),
        past_key_values=shared_rows(cache, rows),
        use_cache=True,
    ).last_hidden_state
    return hidden[torch.arange(n, device=device), (keep.sum(1) - 1).to(device)]


@torch.no_grad()
def score_last_token(
    model: Any, builder: PromptBuilder, specs: Sequence[PromptSpec], n_variants: int, fwd_hooks: Sequence = ()
) -> Float[Tensor, "spec variant"]:
    """Margins of `n_variants` copies of each of `specs` that differ only in what `fwd_hooks` do
    at the last token (the hooks see a [spec × variant, 1, d] slice, spec-major). Every earlier
    position runs once per spec without `fwd_hooks` — an edit at the last position cannot reach
    it — and the last token runs once per variant on that key/value cache."""
    inputs = builder.build(specs)
    device, width = model.device, inputs.input_ids.shape[1]
    cache = shared_rows(prefix_cache(model, inputs, torch.arange(width - 1).expand(len(inputs), -1)), n_variants)

    def repeat(t: Tensor) -> Tensor:
        return t.to(device).repeat_interleave(n_variants, dim=0)

    with model.hooks(fwd_hooks=list(fwd_hooks)):
        hidden = model.hf_hidden(
            input_ids=repeat(inputs.input_ids[:, -1:]),
            attention_mask=repeat(inputs.attention_mask),
            position_ids=repeat(inputs.position_ids[:, -1:]),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    return model.answer_margin(hidden[:, -1]).reshape(len(specs), n_variants)
