"""The hooks that cache a forward's activations, and the early stop that ends a forward once they hold
everything asked for.

A caller that wants activations alone (an SAE's training stream, a site's encoding, the token
embeddings) need not pay for the layers after its hook, nor for the unembedding: at MedGemma's
262,208-token vocabulary the last position's logits alone read a 2.7 GB matrix. `Recorder(stop=True)`
raises `StopForward` from the hook that completes the cache — TransformerLens's `stop_at_layer`,
nnsight's `.stop()` — and `HookedVLM.cache_activations` catches it.

The stop is raised only from a language-model hook (`blocks.*`, `ln_final.*`), each of which fires
once per forward. A cache of vision or projector hooks alone stops at the language model's first
hook, by which point every image has gone through the tower however many times a family calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from flipscope.model.hook_points import Positions, check_positions, is_pattern_hook, is_text_hook, select_positions

__all__ = ["FIRST_TEXT_HOOK", "Recorder", "StopForward", "selected_names"]

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
FIRST_TEXT_HOOK = "blocks.0.hook_resid_pre"


class StopForward(Exception):
    """Ends a forward whose cache is complete (raised by a `Recorder` hook, caught by its caller)."""


def selected_names(names: Iterable[str], names_filter: NamesFilter) -> list[str]:
    """The hook names a `names_filter` picks: one name, a list, a predicate over `names`, or all of them
    but the attention patterns (reading one switches attention to HF's eager kernel: only by name)."""
    if names_filter is None:
        return [name for name in names if not is_pattern_hook(name)]
    if isinstance(names_filter, str):
        return [names_filter]
    if callable(names_filter):
        return [name for name in names if names_filter(name)]
    return list(names_filter)


class Recorder:
    """Hooks that store the activations at `names` (language-model hooks at `positions` only, an
    attention pattern at those query positions; detached, on `device`), and with `stop`, end the
    forward once every one of them is stored.

    Attributes:
        cache: Hook name → the activation stored (filled as the forward runs).
    """

    def __init__(
        self,
        names: Sequence[str],
        positions: Positions = None,
        device: str | torch.device | None = None,
        *,
        stop: bool = False,
    ) -> None:
        check_positions(positions)
        self.names, self.positions, self.device, self.stop = list(names), positions, device, stop
        self.cache: dict[str, Tensor] = {}
        self._waiting = set(self.names)

    def hooks(self, available: Iterable[str]) -> list[tuple[str, Callable[[Tensor, HookPoint], None]]]:
        """The forward hooks to put on (with `stop`, a guard at the language model's first hook, where
        it is `available`, for a cache of vision hooks alone)."""
        hooks = [(name, self._save) for name in self.names]
        if self.stop and FIRST_TEXT_HOOK in available and FIRST_TEXT_HOOK not in self.names:
            hooks.append((FIRST_TEXT_HOOK, self._stop_if_done))
        return hooks

    def _save(self, tensor: Tensor, hook: HookPoint) -> None:
        name = hook.name
        if is_pattern_hook(name):  # [batch head query key]: the positions are queries
            kept = select_positions(tensor.transpose(1, 2), self.positions)
            kept = kept.transpose(1, 2) if kept.dim() == tensor.dim() else kept
        else:
            kept = select_positions(tensor, self.positions) if is_text_hook(name) else tensor
        self.cache[name] = kept.detach().to(self.device) if self.device is not None else kept.detach()
        self._waiting.discard(name)
        if is_text_hook(name):
            self._stop_if_done(tensor, hook)

    def _stop_if_done(self, tensor: Tensor, hook: HookPoint) -> None:
        if self.stop and not self._waiting:
            raise StopForward(hook.name)
