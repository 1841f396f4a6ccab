"""`HookPoint`s fired from HF modules, attached only while in use, and activation selection.

An attention pattern (`blocks.{L}.attn.hook_pattern`, `[batch head query key]`) is what HF's
attention module returns beside its output, and only its eager kernel computes it (sdpa fuses the
softmax away). While a pattern hook is on, the language model's config names the eager kernel
(causal masks are built for it too), and the kernel it named before returns when the last pattern
hook comes off: the forward then equals HF's own eager forward, and every other forward stays on
HF's default. The pattern is read only: the layer has used it by the time it is returned, so a
hook that returns a changed pattern raises instead of changing nothing.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from flipscope.errors import FlipscopeError
from flipscope.model.hook_names import HookSite

__all__ = [
    "Positions",
    "SiteHookPoint",
    "check_activation_hook",
    "check_positions",
    "describe_names",
    "is_pattern_hook",
    "is_text_hook",
    "select_positions",
]

Positions = int | Literal["last"] | slice | Sequence[int] | Int[Tensor, "batch"] | None

# config id → [pattern hooks on, the attention kernel it named before the first]
_EAGER: dict[int, list[Any]] = {}


def _eager_on(config: Any) -> None:
    held = _EAGER.setdefault(id(config), [0, config._attn_implementation])
    held[0] += 1
    config._attn_implementation = "eager"


def _eager_off(config: Any) -> None:
    held = _EAGER[id(config)]
    held[0] -= 1
    if not held[0]:
        config._attn_implementation = held[1]
        del _EAGER[id(config)]


class SiteHookPoint(HookPoint):
    """A `HookPoint` fired from an HF module; attaches its torch hook there only while in use."""

    def __init__(self, site: HookSite) -> None:
        super().__init__()
        self._site = (site,)  # a tuple, so the HF module is not registered as a child
        self._site_handle: torch.utils.hooks.RemovableHandle | None = None

    def add_hook(self, *args: Any, **kwargs: Any) -> None:
        super().add_hook(*args, **kwargs)
        self._sync_site()

    def remove_hooks(self, *args: Any, **kwargs: Any) -> None:
        super().remove_hooks(*args, **kwargs)
        self._sync_site()

    def _fire_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def _fire_pattern(self, module: nn.Module, args: Any, output: tuple) -> None:
        weights = output[1]
        if weights is None:
            raise FlipscopeError(f"{self.name}: {type(module).__name__} returned no attention weights")
        if self(weights) is not weights:
            raise FlipscopeError(
                f"{self.name} is read only: the layer has used the pattern when the hook sees it "
                "(edit a head's output, attn.hook_z, instead)"
            )

    def _fire_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}

    def _sync_site(self) -> None:
        in_use = bool(self.fwd_hooks or self.bwd_hooks)
        if in_use and self._site_handle is None:
            module, reads = self._site[0]
            if reads == "output":
                self._site_handle = module.register_forward_hook(self._fire_output)
            elif reads == "pattern":
                _eager_on(module.config)
                self._site_handle = module.register_forward_hook(self._fire_pattern)
            else:
                self._site_handle = module.register_forward_pre_hook(self._fire_input, with_kwargs=True)
        elif not in_use and self._site_handle is not None:
            self._site_handle.remove()
            self._site_handle = None
            module, reads = self._site[0]
            if reads == "pattern":
                _eager_off(module.config)


def describe_names(names: Sequence[str]) -> str:
    """Hook names compressed for an error message: `blocks.{0..33}.hook_resid_post, ...`."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[str] = []
    for name in names:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            singles.append(name)
            continue
        key = (".".join(parts[:index]), ".".join(parts[index + 1 :]))
        groups.setdefault(key, []).append(int(parts[index]))
    described = [f"{pre}.{{{min(ix)}..{max(ix)}}}.{post}" for (pre, post), ix in groups.items()]
    return ", ".join(described + singles)


def is_text_hook(name: str) -> bool:
    return name.startswith(("blocks.", "ln_final."))


def is_pattern_hook(name: str) -> bool:
    """An attention pattern's hook (`[batch head query key]`: positions select queries)."""
    return name.endswith(".attn.hook_pattern")


def check_activation_hook(vlm: Any, hook: str) -> None:
    """`vlm.check_hook_name`, and refuse an attention pattern where an activation `[batch pos d]` is
    read (an SAE's site, a pair's, a probe's).

    Raises:
        FlipscopeError: an unknown hook name, or an attention pattern's.
    """
    vlm.check_hook_name(hook)
    if is_pattern_hook(hook):
        raise FlipscopeError(
            f"{hook} is an attention pattern [batch head query key], not an activation with a width an SAE, a pair "
            f"or a probe reads: use {hook.replace('hook_pattern', 'hook_z')} (the heads' outputs) or "
            f"{hook.replace('attn.hook_pattern', 'hook_attn_out')}"
        )


def check_positions(positions: Any) -> None:
    """Refuse, before any forward, a `positions` that `select_positions` cannot index with (typed
    `Any`: it is the check, so it takes whatever a caller passed)."""
    if (
        positions is None
        or isinstance(positions, slice | Tensor)
        or (isinstance(positions, str) and positions == "last")
    ):
        return
    try:
        items = [positions] if isinstance(positions, str | numbers.Number) else list(positions)
    except TypeError:
        items = [positions]
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in items):
        raise FlipscopeError(
            f"positions {positions!r}: expected an int, 'last', a slice, a list of ints or a per-row index tensor"
        )


def select_positions(tensor: Float[Tensor, "batch pos *rest"], positions: Positions) -> Tensor:
    if positions is None:
        return tensor
    if positions == "last":
        positions = -1
    if isinstance(positions, Tensor):
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        return tensor[rows, positions.to(tensor.device)]
    if isinstance(positions, int | slice):
        # Basic indexing returns a view that would keep the whole activation alive: copy.
        return tensor[:, positions].clone()
    return tensor[:, list(positions)]
