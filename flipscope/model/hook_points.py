"""`HookPoint`s fired from HF modules, attached only while in use, and activation selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from flipscope.model.hook_names import HookSite

__all__ = ["Positions", "SiteHookPoint", "describe_names", "is_text_hook", "select_positions"]

Positions = int | Literal["last"] | slice | Sequence[int] | Int[Tensor, "batch"] | None


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
            else:
                self._site_handle = module.register_forward_pre_hook(self._fire_input, with_kwargs=True)
        elif not in_use and self._site_handle is not None:
            self._site_handle.remove()
            self._site_handle = None


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


def select_positions(tensor: Float[Tensor, "batch pos d"], positions: Positions) -> Tensor:
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
