"""The one way an estimate is printed: `value [low, high]`, or n/a when it rests on no units.

Plain Python, no plotting or model imports, so the CLI can print without loading either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["fmt"]


def fmt(estimate: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`value [low, high]` of an estimate dict, or n/a when it has no units."""
    if not estimate or estimate.get("n") == 0:
        return "n/a"
    return f"{estimate['value']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"
