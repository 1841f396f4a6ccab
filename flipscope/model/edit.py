"""`Edit`: a fixed change to one hook point, the unit an edited model is made of."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Edit", "HookFn"]

HookFn = Callable[..., Any]


@dataclass(frozen=True)
class Edit:
    """A fixed change to one hook point, applied on every forward of an edited model.

    Attributes:
        hook_name: Where the edit applies (a `HookedVLM` hook name).
        fn: A TransformerLens hook function `(activation, hook) -> activation`.
        description: What the edit is, merged into the edited model's `identity()` so a result
            file written with one edit never resumes under another.
    """

    hook_name: str
    fn: HookFn = field(compare=False)
    description: Mapping[str, Any] = field(default_factory=dict)
