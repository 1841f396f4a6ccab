"""The one error type flipscope raises for bad input."""

from __future__ import annotations

__all__ = ["FlipscopeError", "first_line", "problems_error"]


class FlipscopeError(ValueError):
    """Bad input to flipscope: a missing or corrupt file, an unknown option or hook name, a model
    or tokenizer that lacks what flipscope needs. The message names the offending value and what
    was expected; it is meant to be shown to a user as one line."""


def problems_error(what: str, problems: list[str], limit: int = 50) -> FlipscopeError:
    """One error for every problem found in `what`: one line when there is one, else a count and
    a line per problem (the first `limit`)."""
    if len(problems) == 1:
        return FlipscopeError(f"{what}: {problems[0]}")
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return FlipscopeError(f"{len(problems)} problems in {what}:\n" + "\n".join(problems[:limit]) + more)


def first_line(err: BaseException) -> str:
    """An exception's first line (its type where it says nothing), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
