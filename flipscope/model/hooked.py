"""`HookedVLM`: TransformerLens-style hooks on a real HF model of any family.

`HookedVLM` is a `transformer_lens.HookedRootModule` around an unmodified HF model of a family in
`flipscope.model.families` (`Gemma3ForConditionalGeneration` for MedGemma 4B, `Gemma3ForCausalLM`,
LLaVA, Qwen2.5-VL, or any image-text-to-text model). Each hook name of the family's table is a
`HookPoint`; a torch hook on the HF module that the table names
calls the `HookPoint` — and that torch hook exists only while the `HookPoint` has hooks, so an
unhooked forward is the plain HF forward (same kernels, sdpa attention, bit-identical logits)
and a hooked one pays only for the sites it uses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from flipscope.errors import FlipscopeError
from flipscope.model import kv
from flipscope.model.answers import AnswerTokens, head_margin, yes_no_margin
from flipscope.model.caching import NamesFilter, Recorder, StopForward, selected_names
from flipscope.model.edit import Edit, HookFn
from flipscope.model.families import Family, family_of
from flipscope.model.hook_points import Positions, SiteHookPoint, describe_names
from flipscope.model.identity import model_identity
from flipscope.model.loading import load_hf_vlm, merge_adapter
from flipscope.model.prompts import ModelInputs, PromptBuilder, PromptSpec
from flipscope.model.vision_once import ImageMemo, encode_images_once

__all__ = ["Edit", "HookedVLM", "Positions"]

logger = logging.getLogger(__name__)


class HookedVLM(HookedRootModule):
    """A VLM (or text model) with TransformerLens hook points and yes/no scoring.

    Every forward — `forward`, `score`, `generate`, the caches and the KV-cache paths of
    `flipscope.model.kv` — runs through `hf_forward`, which applies the model's `edits` exactly
    once, whatever hooks or contexts are active. `edited(...)` returns a sibling that shares the
    HF weights and carries more edits (this is how clamped and ablated models are made).

    Attributes:
        hf_model: The wrapped HF model (never modified).
        processor: Its processor (tokenizer, image processor, chat template), or its tokenizer.
        family: Its `Family` (hook table, forward arguments, fast-path soundness).
        prompts: A `PromptBuilder` over the processor.
        name_or_path: Where it was loaded from, for result files.
        adapter: The PEFT adapter merged into the weights at load, if any (its folder).
        edits: The fixed edits every forward applies (none for a loaded model).
    """

    def __init__(
        self,
        hf_model: nn.Module,
        processor: Any,
        *,
        family: Family | None = None,
        name_or_path: str = "",
        adapter: str | None = None,
        edits: Sequence[Edit] = (),
        prompts: PromptBuilder | None = None,
        image_memo: ImageMemo | None = None,
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.processor = processor
        self.family = family if family is not None else family_of(hf_model.config)
        self.prompts = prompts if prompts is not None else PromptBuilder(processor)
        self.name_or_path = name_or_path
        self.adapter = adapter
        self._edit_depth = 0
        self._images_once = 0
        self.image_memo = image_memo if image_memo is not None else ImageMemo()  # see `distinct_images`
        self._hook_points: dict[str, SiteHookPoint] = {}
        for name, site in self.family.sites(hf_model).items():
            point = SiteHookPoint(site)
            *parents, leaf = name.split(".")
            node: nn.Module = self
            for part in parents:
                child = node._modules.get(part)
                if child is None:
                    child = nn.Module()
                    node.add_module(part, child)
                node = child
            node.add_module(leaf, point)
            self._hook_points[name] = point
        self.setup()
        for edit in edits:
            self.check_hook_name(edit.hook_name)
        self.edits: tuple[Edit, ...] = tuple(edits)

    def edited(self, *edits: Edit) -> HookedVLM:
        """A sibling that shares this model's weights, processor and prompt builder and applies
        `edits` (after this model's own) on every forward; this model stays as it is."""
        return HookedVLM(**self.sibling_args(*edits))

    def sibling_args(self, *edits: Edit) -> dict[str, Any]:
        """The constructor arguments of a sibling with `edits` added (for `edited` and subclasses)."""
        return {
            "hf_model": self.hf_model,
            "processor": self.processor,
            "family": self.family,
            "name_or_path": self.name_or_path,
            "adapter": self.adapter,
            "edits": (*self.edits, *edits),
            "prompts": self.prompts,
            "image_memo": self.image_memo,
        }

    def setup(self) -> None:
        """Index the hook points only (TransformerLens's version would also rename HF modules)."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, point in self._hook_points.items():
            point.name = name
            self.mod_dict[name] = point
            self.hook_dict[name] = point

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
        adapter: str | os.PathLike[str] | None = None,
        family: str | None = None,
        gguf_file: str | None = None,
    ) -> HookedVLM:
        """Load a model and its processor by hub id (e.g. `google/medgemma-4b-it`) or local dir.

        Weights are read from safetensors only and no remote code is run. `attn_implementation`
        stays HF's default (sdpa) unless given. `adapter`: a PEFT (LoRA) adapter folder, merged
        into the weights, so every hook and path works on the fine-tuned model unchanged.
        `family`: force a family (`flipscope.model.families`; default: from `config.model_type`).
        A GGUF (`name_or_path` ending in `.gguf`, or a folder and `gguf_file`) is converted once
        into a cached safetensors folder (`flipscope.model.gguf`).

        Raises:
            FlipscopeError: the directory or hub model cannot be loaded, or is of no family.
        """
        from flipscope.model.gguf import resolve_gguf

        hf_model, processor, chosen = load_hf_vlm(
            resolve_gguf(name_or_path, gguf_file),
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            family=family,
        )
        if adapter is not None:
            hf_model = merge_adapter(hf_model, adapter)
        adapter_name = None if adapter is None else str(adapter)
        return cls(hf_model, processor, family=chosen, name_or_path=str(name_or_path), adapter=adapter_name)

    # ----------------------------------------------------------------------------------- facts
    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.get_text_config().num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.get_text_config().hidden_size)

    @property
    def fast_path_off(self) -> str | None:
        """Why the KV-cache fast paths are unsound for this model's family (None: they are used)."""
        return self.family.fast_path_off

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def context_length(self) -> int:
        """Longest sequence the language model takes (`max_position_embeddings`)."""
        return int(self.hf_model.config.get_text_config().max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def identity(self) -> dict[str, Any]:
        """Which model produced a result (`flipscope.model.identity.model_identity`): name, family,
        size, a weight fingerprint, adapter and edits, so result files can be checked against a model."""
        return model_identity(self)

    @cached_property
    def answer_tokens(self) -> AnswerTokens:
        """Yes/no token ids of this model's tokenizer (see `flipscope.model.answers`)."""
        return AnswerTokens.from_tokenizer(self.prompts.tokenizer)

    # ----------------------------------------------------------------------------------- hooks
    def check_hook_name(self, name: str) -> None:
        """Raise `FlipscopeError` listing the valid names if `name` is not a hook point."""
        if name not in self.hook_dict:
            raise FlipscopeError(f"unknown hook name {name!r}; valid names: {describe_names(list(self.hook_dict))}")

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, *args: Any, **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedVLM]:
        """Hooks added for the duration of the block and removed in `finally`, even on error.

        The model's edits are on for the block too (once, however deeply blocks nest), ahead of
        these hooks, so a hook sees the edited activation."""
        for name, _ in (*fwd_hooks, *bwd_hooks):
            if isinstance(name, str):
                self.check_hook_name(name)
        with self._edits_on(), super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts):
            yield self

    @contextmanager
    def _edits_on(self) -> Iterator[None]:
        """The edits' hooks for the outermost block only, so each fires once per forward."""
        first = self._edit_depth == 0 and bool(self.edits)
        self._edit_depth += 1
        try:
            if first:
                with HookedRootModule.hooks(self, [(e.hook_name, e.fn) for e in self.edits]):
                    yield
            else:
                yield
        finally:
            self._edit_depth -= 1

    def hf_forward(self, **kwargs: Any) -> Any:
        """The HF model's forward on keyword arguments, with this model's edits on: the one call
        every path makes (the KV-cache paths pass `past_key_values`)."""
        with self._edits_on():
            return self.hf_model(**self._hf_kwargs(kwargs))

    def hf_hidden(self, **kwargs: Any) -> Any:
        """The HF base model's forward (no unembedding), with the edits on; see `unembed`."""
        with self._edits_on():
            return self.hf_model.model(**self._hf_kwargs(kwargs))

    def _hf_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """flipscope's forward arguments as the family's forward takes them (each distinct image
        encoded once inside `distinct_images`, where the family allows it)."""
        kwargs = self.family.forward_kwargs(self.hf_model, kwargs)
        return encode_images_once(self, kwargs) if self._images_once and self.family.images_once else kwargs

    @contextmanager
    def distinct_images(self) -> Iterator[HookedVLM]:
        """Inside the block each distinct image goes through the vision tower once, alone, and stays
        in `image_memo` (shared with edited siblings) for later blocks (`flipscope.model.vision_once`)."""
        self._images_once += 1
        try:
            yield self
        finally:
            self._images_once -= 1

    def unembed(self, hidden: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Logits of final hidden states, as the HF forward computes them from `hf_hidden`'s output."""
        return self.hf_model.get_output_embeddings()(hidden)

    def answer_margin(self, hidden: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """Yes−no margin of final hidden states from the answer tokens' unembedding rows alone
        (`flipscope.model.answers.head_margin`): what the KV-cache paths read."""
        return head_margin(hidden, self.hf_model.get_output_embeddings(), self.answer_tokens, self.logit_cap)

    @property
    def logit_cap(self) -> float | None:
        """The soft cap the HF forward puts on its logits (the family's `logit_cap`), or None."""
        return self.family.logit_cap(self.hf_model)

    # ----------------------------------------------------------------------------------- running
    @staticmethod
    def _kwargs(inputs: ModelInputs | Mapping[str, Tensor]) -> dict[str, Tensor]:
        return inputs.as_kwargs() if isinstance(inputs, ModelInputs) else dict(inputs)

    def forward(
        self, inputs: ModelInputs | Mapping[str, Tensor], *, logits_to_keep: int = 0
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the HF forward on `inputs` (all positions, or the last `logits_to_keep`)."""
        return self.hf_forward(**self._kwargs(inputs), use_cache=False, logits_to_keep=logits_to_keep).logits

    def run_with_cache(
        self,
        inputs: ModelInputs | Mapping[str, Tensor],
        *,
        names_filter: NamesFilter = None,
        positions: Positions = None,
        device: str | torch.device | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
        """Run the model and cache the activations asked for.

        Args:
            inputs: A batch from `PromptBuilder.build` (left-padded) or HF processor output.
            names_filter: A hook name, a list of names, or a predicate; None caches every hook.
            positions: Token positions to keep for the language-model hooks (`blocks.*`,
                `ln_final.*`): an int or `"last"` (drops the position axis), a slice or list of
                ints, or a per-row index tensor `[batch]`. Vision and projector hooks are kept
                whole. Only the selection is stored, so a sweep does not hold every activation.
            device: Where to store the cache (default: the model's device).
            logits_to_keep: Return logits for the last this many positions only (0: all); 1
                when only the answer is read spares the unembedding of every position.

        Returns:
            The logits and a dict from hook name to activation (detached).
        """
        recorder = Recorder(selected_names(self.hook_dict, names_filter), positions, device)
        with self.hooks(fwd_hooks=recorder.hooks(self.hook_dict)):
            logits = self(inputs, logits_to_keep=logits_to_keep)
        return logits, recorder.cache

    def cache_activations(
        self,
        inputs: ModelInputs | Mapping[str, Tensor],
        *,
        names_filter: NamesFilter,
        positions: Positions = None,
        device: str | torch.device | None = None,
    ) -> dict[str, Tensor]:
        """`run_with_cache`'s cache alone, from a forward that ends as soon as it holds every hook asked
        for: no later layer and no unembedding runs (`flipscope.model.caching`). Where a selected hook
        does not fire (a vision hook on a prompt without an image), the forward runs to its end."""
        recorder = Recorder(selected_names(self.hook_dict, names_filter), positions, device, stop=True)
        with self.hooks(fwd_hooks=recorder.hooks(self.hook_dict)), suppress(StopForward):
            self(inputs, logits_to_keep=1)
        return recorder.cache

    def run_with_hooks(
        self,
        inputs: ModelInputs | Mapping[str, Tensor],
        *,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        logits_to_keep: int = 0,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits with `fwd_hooks` (and `bwd_hooks`) active for this one forward."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(inputs, logits_to_keep=logits_to_keep)

    def last_logits(self, inputs: ModelInputs | Mapping[str, Tensor]) -> Float[Tensor, "batch d_vocab"]:
        """Next-token logits at the last prompt position (inputs must be left-padded)."""
        kwargs = self._kwargs(inputs)
        if "attention_mask" in kwargs and not bool(kwargs["attention_mask"][:, -1].all()):
            raise FlipscopeError("inputs are right-padded; build them with PromptBuilder (left padding)")
        return self(kwargs, logits_to_keep=1)[:, -1]

    @torch.no_grad()
    def score(self, inputs: ModelInputs | Mapping[str, Tensor]) -> Float[Tensor, " batch"]:
        """Yes-minus-no margin at the last prompt position, one per row (float32)."""
        return yes_no_margin(self.last_logits(inputs), self.answer_tokens)

    @torch.no_grad()
    def generate(self, inputs: ModelInputs | Mapping[str, Tensor], *, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers as text, with any active hooks firing at every step."""
        kwargs = self._kwargs(inputs)
        kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
        kwargs = {k: v for k, v in self.family.forward_kwargs(self.hf_model, kwargs).items() if k != "position_ids"}
        prompt_len = kwargs["input_ids"].shape[1]
        with self._edits_on():
            out = self.hf_model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.prompts.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)

    # ----------------------------------------------------------------------------------- KV-cache paths
    def run_prefix(self, spec: PromptSpec, *, builder: PromptBuilder | None = None) -> kv.Prefix:
        """The key/value cache of `spec`'s template prefix (image included): see `flipscope.model.kv`."""
        return kv.run_prefix(self, builder or self.prompts, spec)

    def score_shared_prefix(
        self,
        specs: Sequence[PromptSpec],
        *,
        builder: PromptBuilder | None = None,
        batch_size: int = 32,
        prefix: kv.Prefix | None = None,
    ) -> Float[Tensor, " batch"]:
        """Margins of prompts that show one image, its prefix computed once (`flipscope.model.kv`)."""
        return kv.score_shared_prefix(self, builder or self.prompts, specs, batch_size, prefix)

    def score_last_token(
        self, specs: Sequence[PromptSpec], n_variants: int, fwd_hooks: Sequence = ()
    ) -> Float[Tensor, "spec variant"]:
        """Margins of `n_variants` last-token variants of each prompt (`flipscope.model.kv`)."""
        return kv.score_last_token(self, self.prompts, specs, n_variants, fwd_hooks)
