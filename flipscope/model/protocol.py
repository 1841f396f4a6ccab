"""`VLM`: the contract every experiment programs against — a scoreable, hookable VLM.

`HookedVLM` and its edited siblings (`ClampedVLM`, `DirectionAblatedVLM`) satisfy it; so can any
model that builds prompts, scores margins and fires TransformerLens-named hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.model.answers import AnswerTokens
from flipscope.model.prompts import ModelInputs, PromptBuilder, PromptSpec

__all__ = ["VLM", "ScoringModel"]

HookList = Sequence[tuple[str | Callable[[str], bool], Callable[..., Any]]]


@runtime_checkable
class ScoringModel(Protocol):
    """What a flip evaluation needs: prompts built from `PromptSpec`s and yes-minus-no margins.
    Every `VLM` is one; so is a user's model adapter (`flipscope.model.adapter.AdaptedModel`)."""

    prompts: Any

    def identity(self) -> dict[str, Any]: ...

    def score(self, inputs: Any) -> Float[Tensor, " batch"]: ...

    def generate(self, inputs: Any, *, max_new_tokens: int = 16) -> list[str]: ...


@runtime_checkable
class VLM(Protocol):
    """A vision-language model flipscope can evaluate, cache, patch and clamp."""

    processor: Any
    prompts: PromptBuilder
    hook_dict: Mapping[str, Any]

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def answer_tokens(self) -> AnswerTokens: ...

    def identity(self) -> dict[str, Any]: ...

    def check_hook_name(self, name: str) -> None: ...

    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = ()) -> AbstractContextManager[Any]: ...

    def score(self, inputs: ModelInputs) -> Float[Tensor, " batch"]: ...

    def last_logits(self, inputs: ModelInputs) -> Float[Tensor, "batch d_vocab"]: ...

    def generate(self, inputs: ModelInputs, *, max_new_tokens: int = 16) -> list[str]: ...

    def run_with_cache(self, inputs: ModelInputs, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]: ...

    def cache_activations(self, inputs: ModelInputs, **kwargs: Any) -> dict[str, Tensor]: ...

    def run_with_hooks(self, inputs: ModelInputs, **kwargs: Any) -> Tensor: ...

    def run_prefix(self, spec: PromptSpec, **kwargs: Any) -> Any: ...

    def score_shared_prefix(self, specs: Sequence[PromptSpec], **kwargs: Any) -> Float[Tensor, " batch"]: ...

    def score_last_token(
        self, specs: Sequence[PromptSpec], n_variants: int, fwd_hooks: HookList = ()
    ) -> Float[Tensor, "spec variant"]: ...
