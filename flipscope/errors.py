"""The one error type flipscope raises for bad input."""

from __future__ import annotations

__all__ = ["FlipscopeError"]


class FlipscopeError(ValueError):
    """Bad input to flipscope: a missing or corrupt file, an unknown option or hook name, a model
    or tokenizer that lacks what flipscope needs. The message names the offending value and what
    was expected; it is meant to be shown to a user as one line."""
