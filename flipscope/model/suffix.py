"""Many edited forwards of one batch, with the part no edit reaches run once.

The causal trace runs one batch of paraphrases again and again — clean, corrupted, one forward
per layer × position group restored, one per framing word — with edits only inside the
question. The positions before it (chat header, image block, its newlines) attend only to one
another (image tokens bidirectionally within their block), so their keys and values are the same
in every run. `batch_runs` cuts a left-padded batch before its questions, runs the prefix once
(the vision tower included; one row per distinct film, which all of its rows read) and every
later forward on the question and the template's tail alone, right-padded on that key/value
cache: of MedGemma's ~280-token prompts a forward runs the last ~20 tokens, and no tower. Edits
and caches are in those suffix positions; `to_run` moves a tensor over the batch's positions
there. The FlipBank's pairs (`collect_pairs`), with several prompts per film, run the same way.
`prompt_activations` reads hooks at every position of such a batch (a feature dashboard) the same
way, both forwards ending at the last hook: each film's ~265-token prefix once, not once a wording.
Where the family's KV-cache paths are unsound (`fast_path_off`), the model has no `hf_hidden`,
or the rows' prefixes differ in tokens, every forward runs the whole batch (`FullRuns`, the same
interface). Margins equal the full forwards' to float rounding (tested to 1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.answers import yes_no_margin
from flipscope.model.caching import Recorder, StopForward
from flipscope.model.hook_points import is_text_hook
from flipscope.model.kv import prefix_cache, suffix_last_hidden
from flipscope.model.prompts import ModelInputs, PromptSpec
from flipscope.model.vision_once import distinct_rows

__all__ = ["FullRuns", "SuffixReads", "SuffixRuns", "batch_runs", "prompt_activations", "question_runs"]


class FullRuns:
    """Every forward over the whole left-padded batch (positions as the batch has them)."""

    def __init__(self, vlm: Any, inputs: ModelInputs) -> None:
        self.vlm, self.inputs = vlm, inputs

    def to_run(self, values: Tensor) -> Tensor:
        """`values` over the batch's positions ([batch, pos, ...]), as a forward sees them."""
        return values

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        """Each row's last prompt position in a forward's activations."""
        return torch.full((len(self.inputs),), self.inputs.input_ids.shape[1] - 1)

    def margins(self, fwd_hooks: Sequence = (), grad: bool = False) -> Float[Tensor, " batch"]:
        """Margins of the batch with `fwd_hooks` on (at the positions `to_run` gives); with
        `grad`, the forward records its graph (attribution's backward)."""
        with torch.set_grad_enabled(grad):
            logits = self.vlm.run_with_hooks(self.inputs, fwd_hooks=list(fwd_hooks), logits_to_keep=1)
            return yes_no_margin(logits[:, -1], self.vlm.answer_tokens)

    @torch.no_grad()
    def run_with_cache(
        self, names: Sequence[str], last: bool = False
    ) -> tuple[Float[Tensor, " batch"], dict[str, Tensor]]:
        """Margins of the unedited batch and the activations at `names` (at every position a
        forward runs, or with `last` at each row's last one: [batch, ...])."""
        logits, cache = self.vlm.run_with_cache(
            self.inputs, names_filter=list(names), positions="last" if last else None, logits_to_keep=1
        )
        return yes_no_margin(logits[:, -1], self.vlm.answer_tokens), dict(cache.items())


class SuffixRuns(FullRuns):
    """Forwards of the batch's suffixes (from column `cut` of each row's real tokens) on the key/
    value cache of its prefixes, run once."""

    def __init__(self, vlm: Any, inputs: ModelInputs, cut: int) -> None:
        super().__init__(vlm, inputs)
        real = inputs.attention_mask.sum(1)
        self.pad = inputs.input_ids.shape[1] - real  # left padding of each row
        self.lengths = real - cut  # each row's suffix length
        self.cut = cut
        kept, self.prefix_rows = _distinct_prefixes(inputs)
        prefixes = inputs if len(kept) == len(inputs) else inputs.rows(kept)
        with torch.no_grad():  # one prefix row for each distinct image, which all its rows read
            self.cache = self._prefix_cache(prefixes, self.pad[kept, None] + torch.arange(cut))
        width = int(self.lengths.max())
        self.keep: Bool[Tensor, "batch suffix"] = torch.arange(width) < self.lengths[:, None]
        self.columns: Int[Tensor, "batch suffix"] = torch.where(
            self.keep, self.pad[:, None] + cut + torch.arange(width), 0
        )
        pad_id = int(vlm.prompts.tokenizer.pad_token_id)
        self.input_ids = torch.where(self.keep, inputs.input_ids.gather(1, self.columns), pad_id)

    def _prefix_cache(self, prefixes: ModelInputs, columns: Int[Tensor, "row cut"]) -> Any:
        return prefix_cache(self.vlm, prefixes, columns)

    def to_run(self, values: Tensor) -> Tensor:
        """`values` over the batch's positions, at the suffix's positions (zero or False on its
        right padding). A value set before the cut could not reach the run: that is an error."""
        if values.dtype == torch.bool and bool((values & _before_cut(self.pad, self.cut, values.shape[1])).any()):
            raise FlipscopeError(f"a mask selects positions before the cut at {self.cut}: suffix runs do not hold them")
        index = self.columns.to(values.device).reshape(*self.columns.shape, *([1] * (values.dim() - 2)))
        moved = values.gather(1, index.expand(*self.columns.shape, *values.shape[2:]))
        keep = self.keep.to(values.device).reshape(index.shape)
        return torch.where(keep, moved, torch.zeros((), dtype=values.dtype, device=values.device))

    @property
    def last_positions(self) -> Int[Tensor, " batch"]:
        return self.lengths - 1

    def margins(self, fwd_hooks: Sequence = (), grad: bool = False) -> Float[Tensor, " batch"]:
        with torch.set_grad_enabled(grad), self.vlm.hooks(fwd_hooks=list(fwd_hooks)):
            hidden = suffix_last_hidden(self.vlm, self.cache, self.cut, self.input_ids, self.keep, self.prefix_rows)
            return self.vlm.answer_margin(hidden).float()

    @torch.no_grad()
    def run_with_cache(
        self, names: Sequence[str], last: bool = False
    ) -> tuple[Float[Tensor, " batch"], dict[str, Tensor]]:
        recorder = Recorder(names, self.last_positions if last else None)
        return self.margins(recorder.hooks(names)), recorder.cache


class SuffixReads(SuffixRuns):
    """The batch's activations at `names`, at every position: its prefixes run once (one row per
    distinct film) and its suffixes on their cache, both forwards ending once `names` are recorded.
    The cache holds only the layers before that point, so these runs give no margins."""

    def __init__(self, vlm: Any, inputs: ModelInputs, cut: int, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(vlm, inputs, cut)

    def _prefix_cache(self, prefixes: ModelInputs, columns: Int[Tensor, "row cut"]) -> Any:
        recorder = Recorder(self.names, stop=True)
        cache = prefix_cache(self.vlm, prefixes, columns, until=recorder)
        self.prefix_values = recorder.cache
        return cache

    def margins(self, fwd_hooks: Sequence = (), grad: bool = False) -> Float[Tensor, " batch"]:
        raise FlipscopeError(f"runs whose cache ends at {self.names} read activations; they give no margins")

    @torch.no_grad()
    def activations(self) -> dict[str, Tensor]:
        """Hook name → its activations over the batch's positions ([batch, pos, ...], zero on left padding)."""
        recorder = Recorder(self.names, stop=True)
        with self.vlm.hooks(fwd_hooks=recorder.hooks(self.vlm.hook_dict)), suppress(StopForward):
            suffix_last_hidden(self.vlm, self.cache, self.cut, self.input_ids, self.keep, self.prefix_rows)
        rows = torch.arange(len(self.inputs))[:, None]
        at_prefix = (rows, self.pad[:, None] + torch.arange(self.cut))
        at_suffix = (rows.expand_as(self.keep)[self.keep], self.columns[self.keep])
        out = {}
        for name in self.names:
            prefix, suffix = self.prefix_values[name], recorder.cache[name]
            device = suffix.device
            whole = suffix.new_zeros((len(self.inputs), self.inputs.input_ids.shape[1], *suffix.shape[2:]))
            whole[tuple(i.to(device) for i in at_prefix)] = prefix[self.prefix_rows.to(device)]
            whole[tuple(i.to(device) for i in at_suffix)] = suffix[self.keep.to(device)]
            out[name] = whole
        return out


def _distinct_prefixes(inputs: ModelInputs) -> tuple[list[int], Int[Tensor, " batch"]]:
    """For a batch whose rows share their prefix's tokens: the first row of each distinct prefix
    (rows differ there only by their image) and, per row, the index of its prefix among those."""
    if inputs.pixel_values is None:
        return [0], torch.zeros(len(inputs), dtype=torch.long)
    if inputs.extra or inputs.pixel_values.shape[0] != len(inputs):
        return list(range(len(inputs))), torch.arange(len(inputs))
    return distinct_rows(inputs.pixel_values)


def _before_cut(pad: Int[Tensor, " batch"], cut: int, width: int) -> Bool[Tensor, "batch pos"]:
    """The positions of a left-padded batch (rows padded by `pad`) before each row's `cut`-th real token."""
    return torch.arange(width) < (pad + cut)[:, None]


def question_runs(vlm: Any, specs: Sequence[PromptSpec], hooks: Sequence[str], fast: bool = True) -> FullRuns:
    """The runs of `specs` for edits and reads at `hooks` from their questions on: `batch_runs`
    cut before the questions where every hook is in the language model, else whole prompts."""
    inputs = vlm.prompts.build(specs)
    cut = _question_cut(vlm, specs, inputs, hooks, fast)
    return FullRuns(vlm, inputs) if cut is None else SuffixRuns(vlm, inputs, cut)


def batch_runs(vlm: Any, inputs: ModelInputs, edited: Bool[Tensor, "batch pos"], fast: bool = True) -> FullRuns:
    """The runs of `inputs` for edits confined to `edited` positions (e.g. the question): on
    the suffix path cut before the earliest of them where that is sound (and `fast`), else full
    forwards."""
    cut = _suffix_cut(vlm, inputs, edited) if fast else None
    return FullRuns(vlm, inputs) if cut is None else SuffixRuns(vlm, inputs, cut)


@torch.no_grad()
def prompt_activations(
    vlm: Any, specs: Sequence[PromptSpec], names: Sequence[str], fast: bool = True
) -> tuple[ModelInputs, dict[str, Tensor]]:
    """The batch `specs` build and its activations at language-model hooks `names` over every
    position ([batch, pos, ...], zero on left padding), as `vlm.cache_activations` gives them: on
    the suffix path (`SuffixReads`) where it is sound (and `fast`), else in forwards of whole
    prompts that end at the last hook."""
    inputs = vlm.prompts.build(specs)
    cut = _question_cut(vlm, specs, inputs, names, fast)
    if cut is None:
        return inputs, vlm.cache_activations(inputs, names_filter=list(names))
    return inputs, SuffixReads(vlm, inputs, cut, names).activations()


def _question_cut(
    vlm: Any, specs: Sequence[PromptSpec], inputs: ModelInputs, hooks: Sequence[str], fast: bool
) -> int | None:
    """Where the suffix path cuts the batch `specs` build (`inputs`) before the questions, for
    edits and reads at `hooks`: only where every hook is in the language model (and `fast`)."""
    if not fast or not all(is_text_hook(hook) for hook in hooks):
        return None
    return _suffix_cut(vlm, inputs, vlm.prompts.question_mask(specs, inputs))


def _suffix_cut(vlm: Any, inputs: ModelInputs, edited: Bool[Tensor, "batch pos"]) -> int | None:
    """Where the suffix path cuts `inputs` for edits at `edited` positions: before the earliest of
    them, where the model has the path, every row shares the tokens before it and no image block
    or padding lies after it; else None."""
    if getattr(vlm, "fast_path_off", "no KV-cache path") is not None or not hasattr(vlm, "hf_hidden"):
        return None
    pad = inputs.input_ids.shape[1] - inputs.attention_mask.sum(1)
    if not bool(edited.any(1).all()):
        return None
    cut = int((edited.int().argmax(1) - pad).min())
    rows = inputs.input_ids.gather(1, pad[:, None] + torch.arange(cut))
    after = ~_before_cut(pad, cut, inputs.input_ids.shape[1])
    one_prefix = cut > 0 and bool((rows == rows[:1]).all())
    image_after_cut = bool((inputs.token_type_ids.bool() & after).any())  # an image block must not be split
    if not one_prefix or image_after_cut or bool((inputs.attention_mask[:, -1] == 0).any()):
        return None
    return cut
