"""A feature's sentence, chosen by its intervals: how the paraphrase moves it on the question's
tokens and at the answer position (`flipscope.experiments.dashboard` measures both), and whether
its decoder row writes the answer, by its alignment against the random-direction null, and whether
writing it at the answer position, or switching it off where the wordings differ, moves the margin
beyond random directions of its norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flipscope.reporting.format import fmt

__all__ = ["DENSE", "feature_sentence"]

DENSE = 0.5  # a feature active at more than this share of positions is called dense


def _moves(shift: Mapping[str, Any], place: str) -> str:
    """Paraphrase minus original at `place` on the flips, read by its interval, the controls beside."""
    flips, controls = shift["flips"], shift["controls"]
    if not flips or not flips.get("n"):
        return f"{place}: no flips in the bank"
    beside = f"; same-family controls {fmt(controls)}" if controls and controls.get("n") else ""
    if flips["low"] > 0:
        said = "the paraphrase raises it"
    elif flips["high"] < 0:
        said = "the paraphrase lowers it"
    else:
        said = "no change, as the interval stands"
    return f"{place}, {said} (flips {fmt(flips)}{beside})"


def feature_sentence(feature: str, found: Mapping[str, Any]) -> str:
    """How the wording moves `feature` on the question's tokens and at the answer position (from
    its `density` and `shift`)."""
    density = found["density"]
    if not density:
        return f"Feature {feature} does not fire on the bank's prompts."
    dense = ", dense" if density > DENSE else ""
    shift = found["shift"]
    writes = f" {_writes(found['writes'])}" if "writes" in found else ""
    effect = f" {_effect(found['effect'], found.get('writes'))}" if "effect" in found else ""
    effect += f" {_removal(found['removal'])}" if "removal" in found else ""
    return (
        f"Feature {feature} (active at {density:.0%} of positions{dense}): "
        f"{_moves(shift['question'], 'on the question tokens')}; "
        f"{_moves(shift['last position'], 'at the last position, where the answer is read')}.{writes}{effect}"
    )


def _writes(writes: Mapping[str, Any]) -> str:
    """What the decoder row writes on the direct path, judged by its answer alignment against the null."""
    cos, null = writes["answer_alignment"], writes["null"]
    if abs(cos) > null:
        said = f"writes {'yes' if cos > 0 else 'no'} (answer alignment {cos:+.2f}, beyond the null's {null:.2f})"
    else:
        said = f"does not point at the answer (answer alignment {cos:+.2f}, within the null's {null:.2f})"
    return f"Read directly through the unembedding, its decoder row {said}."


def _effect(effect: Mapping[str, Any], writes: Mapping[str, Any] | None) -> str:
    """What writing the row at the answer position did to the margin, against random directions of
    its norm, and whether that bears out the direct reading (`writes`, where there is one)."""
    if effect["effect"] is None:
        return f"Its effect is not measured: {effect.get('why', 'it never fires on the prompts read')}."
    est, null, n = effect["effect"], effect["null"], effect["n_random"]
    rand = f"the largest of {n} moves it {null:.3f}"
    head = f"Written at the answer position at its peak activation ({effect['scale']:.2f}), it moves the margin"
    if not effect["moves"]:
        said = f"{head} by {fmt(est)}: no more than random directions of its norm do ({rand})"
        direct = writes is not None and abs(writes["answer_alignment"]) > writes["null"]
        return f"{said}, so its direct reading is not borne out." if direct else f"{said}."
    toward = "yes" if est["value"] > 0 else "no"
    said = f"{head} toward {toward} by {fmt(est)}, beyond every one of {n} random directions of its norm ({rand})"
    if writes is None:
        return f"{said}."
    cos, bar = writes["answer_alignment"], writes["null"]
    if abs(cos) <= bar:
        return f"{said}: its row does not point at the answer directly, so the layers after the hook carry it there."
    if (cos > 0) == (est["value"] > 0):
        return f"{said}, as its direct reading says."
    return f"{said}: the opposite of its direct reading, so the layers after the hook turn it around."


def _removal(removal: Mapping[str, Any]) -> str:
    """What switching the feature off on the question and the tail did to the margin, against the
    same amounts removed along random directions: which way it pushes the answer where it fires."""
    if removal["effect"] is None:
        return f"Its removal is not measured: {removal['why']}."
    est, null, n = removal["effect"], removal["null"], removal["n_random"]
    head = f"Switched off on the question and the tail, it moves the margin by {fmt(est)}"
    if not removal["moves"]:
        return (
            f"{head}: no more than random directions removed in the same amounts do (the largest of {n}: {null:.3f})."
        )
    pushes = "yes" if est["value"] < 0 else "no"
    return (
        f"{head}: where it fires it pushes the answer toward {pushes}, beyond every one of {n} random directions "
        f"removed in the same amounts (the largest moves it {null:.3f})."
    )
