"""The one way an estimate is printed: `value [low, high]`, flagged when it rests on fewer than
`MIN_CASES` units, `n/a` when it rests on none or is not a finite number — never `nan`.

Plain Python, no plotting or model imports, so the CLI can print without loading either."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MIN_CASES", "control_text", "edit_label", "fmt", "num"]

MIN_CASES = 10  # fewer units than this and an estimate says so wherever it is printed


def fmt(estimate: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`value [low, high]` of an estimate dict; ` (from only n cases)` appended below `MIN_CASES`;
    `n/a` when it has no units or a non-finite value."""
    if not estimate or estimate.get("n") == 0:
        return "n/a"
    numbers = (estimate["value"], estimate["low"], estimate["high"])
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in numbers):
        return "n/a (not a finite number)"
    text = f"{numbers[0]:.{digits}f} [{numbers[1]:.{digits}f}, {numbers[2]:.{digits}f}]"
    n = estimate.get("n")
    if isinstance(n, int) and n < MIN_CASES:
        text += f" (from only {n} case{'' if n == 1 else 's'})"
    return text


def num(value: Any, spec: str = ".3f") -> str:
    """One number in format `spec`, or `n/a` when it is missing or not finite."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def control_text(patch: Mapping[str, Any]) -> str:
    """A patch summary's matched control features: their recovery, with how large their own push
    is beside the patched features' (a control that barely moves proves little)."""
    control = patch.get("matched_control_feature", {}).get("mean_recovery")
    ratio = patch.get("setup", {}).get("control_size_ratio")
    return fmt(control) + (f" (a push {ratio:.2f}× the features')" if control and ratio is not None else "")


def edit_label(description: Mapping[str, Any]) -> str:
    """A short name for an edited model's edit other than a clamp (an `EditedVLM.description`):
    `DiffMean ablated`, `head 0.0 mean-ablated`, else `intervention`."""
    if "ablate_direction" in description:
        return f"{description['ablate_direction']['name']} ablated"
    if "ablate_heads" in description:
        d = description["ablate_heads"]
        heads = ", ".join(f"{d['layer']}.{h}" for h in d["heads"])
        return f"head{'s' if len(d['heads']) > 1 else ''} {heads} {d['by']}-ablated"
    return "intervention"
