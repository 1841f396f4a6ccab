"""Interventions: pure hook functions, and edited sibling models that apply one on every forward."""

from flipscope.interventions.edited import ClampedVLM, DirectionAblatedVLM, EditedVLM, clamp
from flipscope.interventions.hooks import (
    ablate_direction_hook,
    clamp_hook,
    replace_at_last,
    shift_features_hook,
    splice_features_hook,
    subtract_at_last,
)

__all__ = [
    "ClampedVLM",
    "DirectionAblatedVLM",
    "EditedVLM",
    "ablate_direction_hook",
    "clamp",
    "clamp_hook",
    "replace_at_last",
    "shift_features_hook",
    "splice_features_hook",
    "subtract_at_last",
]
