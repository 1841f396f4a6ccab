"""The paper's keyword parse of a generated yes/no answer (pure text, no model).

Affirmative keywords (yes, present, visible, confirmed, shows, evident) against negative ones (no,
absent, not seen, negative, normal, clear), matched as whole words, case-insensitively. Both kinds
or neither → excluded, with the reason. Model outputs and imported answer tables are read by the
same rule, so their flip rates compare.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["AFFIRMATIVE_KEYWORDS", "NEGATIVE_KEYWORDS", "ParsedAnswer", "parse_answer"]

AFFIRMATIVE_KEYWORDS: tuple[str, ...] = ("yes", "present", "visible", "confirmed", "shows", "evident")
NEGATIVE_KEYWORDS: tuple[str, ...] = ("no", "absent", "not seen", "negative", "normal", "clear")


@dataclass(frozen=True)
class ParsedAnswer:
    """A keyword-parsed generated answer: `answer` is None when excluded, with `reason` saying why."""

    answer: Literal["yes", "no"] | None
    reason: str | None = None
    affirmative: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()


def _keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = sorted((r"\s+".join(map(re.escape, k.split())) for k in keywords), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_AFFIRMATIVE = _keyword_pattern(AFFIRMATIVE_KEYWORDS)
_NEGATIVE = _keyword_pattern(NEGATIVE_KEYWORDS)


def parse_answer(text: str) -> ParsedAnswer:
    """Parse a generated answer by keyword (the paper's rule: both kinds or neither → excluded)."""
    affirmative = tuple(m.group(0).lower() for m in _AFFIRMATIVE.finditer(text))
    negative = tuple(m.group(0).lower() for m in _NEGATIVE.finditer(text))
    if affirmative and negative:
        return ParsedAnswer(
            None, f"both affirmative {affirmative} and negative {negative} keywords", affirmative, negative
        )
    if not affirmative and not negative:
        return ParsedAnswer(None, "no affirmative or negative keyword")
    if affirmative:
        return ParsedAnswer("yes", None, affirmative, ())
    return ParsedAnswer("no", None, (), negative)
