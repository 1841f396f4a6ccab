"""The demo's settings (`DemoConfig`), and the lighter ones for an organism on a real base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["REAL_DEMO", "DemoConfig"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs.

    Attributes:
        n_films: Held-out films evaluated (4 questions each, 10 prompts per question).
        conditions: Image conditions; `blank` is the paper's "image removed".
        top_k: Features patched together: the first `top_k` by attribution.
        clamp_values: Values the top feature is clamped to (the trade-off curve).
        trace_cases: Flips traced to find where the framing enters.
        layer_stride: Every how many layers the layer sweep and the trace look (1: all).
        exact_top: Top attributed features checked by exact single-feature ablation.
        count_top: The first how many of discovery's features (framing, else attribution) are removed
            together, one count at a time.
        seed: Seed of every bootstrap and of the control draw.
    """

    n_films: int = 40
    conditions: tuple[str, ...] = ("image", "blank")
    top_k: int = 5
    clamp_values: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    trace_cases: int = 64
    layer_stride: int = 1
    exact_top: int = 50
    count_top: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        least = {"n_films": 1, "top_k": 1, "trace_cases": 1, "layer_stride": 1, "exact_top": 0, "count_top": 1}
        bad = [f"{k} {getattr(self, k)} (at least {low})" for k, low in least.items() if getattr(self, k) < low]
        if not self.conditions or not self.clamp_values:
            bad.append("no conditions or no clamp values (at least one each)")
        if bad:
            raise FlipscopeError(f"demo settings: {'; '.join(bad)}")

    @classmethod
    def for_organism(cls, card: dict[str, Any], **overrides: Any) -> DemoConfig:
        """The demo's settings for an organism: the defaults, or for one on a real base the
        lighter ones that fit its cost on two cores (`REAL_DEMO`); `overrides` win."""
        base = REAL_DEMO if card["config"].get("base") else {}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


# A 270M-parameter model costs ~0.2 s a prompt on two cores: fewer films, one clamp value, a
# sparser layer sweep; the text-only condition is asked as well.
REAL_DEMO: dict[str, Any] = {
    "n_films": 20,
    "conditions": ("image", "blank", "none"),
    "clamp_values": (0.0,),
    "trace_cases": 16,
    "layer_stride": 3,
    "exact_top": 10,
}
