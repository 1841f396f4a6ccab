"""Interventions: pure hook functions, edited sibling models that apply one on every forward, a
direction folded out of the weights (`fold_writers`) with its run-time twin (`ablate_writers`), and
margins of many last-position edits with each prompt's prefix run once (`variant_margins`)."""

from flipscope.interventions.edited import ClampedVLM, DirectionAblatedVLM, EditedVLM, clamp
from flipscope.interventions.hooks import (
    ablate_direction_hook,
    clamp_hook,
    replace_at_last,
    shift_features_hook,
    splice_features_hook,
    subtract_at_last,
)
from flipscope.interventions.last_token import subtracted_margins, variant_margins
from flipscope.interventions.weight_edit import ablate_writers, fold_writers

__all__ = [
    "ClampedVLM",
    "DirectionAblatedVLM",
    "EditedVLM",
    "ablate_direction_hook",
    "ablate_writers",
    "clamp",
    "clamp_hook",
    "fold_writers",
    "replace_at_last",
    "shift_features_hook",
    "splice_features_hook",
    "subtract_at_last",
    "subtracted_margins",
    "variant_margins",
]
