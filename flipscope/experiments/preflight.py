"""Checks a flip evaluation makes before its first forward, so bad input fails in seconds, not hours
in: every image decodes, the model's family has meaning for the conditions and each question has
its evidence, and no prompt is longer than the model's context."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flipscope.data.questions import Question
from flipscope.errors import FlipscopeError, problems_error
from flipscope.model.images import load_image
from flipscope.model.prompts import IMAGE_CONDITIONS

__all__ = ["check_evidence", "check_prompt_lengths", "image_digests"]


def image_digests(questions: Sequence[Question]) -> dict[Path, str]:
    """Open and decode every image the questions show, before any forward: a hash of each one's
    pixels (so a file re-saved with the same content, or moved, is the same image).

    Raises:
        FlipscopeError: listing every unreadable image with the question lines that use it.
    """
    users: dict[Path, list[str]] = {}
    for q in questions:
        if q.image is not None:
            users.setdefault(q.image, []).append(q.source or q.id)
    digests: dict[Path, str] = {}
    problems: list[str] = []
    for image, where in users.items():
        try:
            pixels = np.asarray(load_image(image))
        except FlipscopeError as err:
            problems.append(f"{err} (used by {', '.join(where[:3])}{' ...' if len(where) > 3 else ''})")
            continue
        digests[image] = hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    if problems:
        raise problems_error("the images (nothing was run)", problems)
    return digests


def check_evidence(questions: Sequence[Question], conditions: Sequence[str], model: Any) -> None:
    """Refuse, before any forward, conditions the model's family has no meaning for and questions
    without the evidence it is shown (an image for a VLM, a `context` passage for a text model).

    Raises:
        FlipscopeError: naming the family's conditions, or listing every question line that lacks
            its evidence.
    """
    family = getattr(model, "family", None)
    supported = family.conditions if family is not None else getattr(model, "conditions", IMAGE_CONDITIONS)
    unsupported = [c for c in conditions if c not in supported]
    if unsupported:
        name = family.name if family is not None else type(getattr(model, "adapter", model)).__name__
        raise FlipscopeError(
            f"conditions {unsupported} have no meaning for a {name} model; its conditions: {', '.join(supported)}"
        )
    field = "context" if conditions[0] == "context" else "image"
    missing = [q.source or q.id for q in questions if getattr(q, field) is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FlipscopeError(
            f"field {field!r} is missing on {len(missing)} question(s) ({shown}); the model is shown it"
        )


def check_prompt_lengths(
    questions: Sequence[Question], builder: Any, context: int | None, *, with_image: bool = True
) -> None:
    """Refuse, before any forward, a prompt longer than the model's context (the chat template's
    tokens around the question, image block included, plus the question's own tokens) instead
    of letting it be truncated or run out of memory hours into a run.

    Raises:
        FlipscopeError: listing every question line with a prompt too long.
    """
    if context is None:
        return
    before, after = builder.template_lengths(with_image=with_image)
    tokenizer = builder.tokenizer
    problems = []
    for q in questions:
        texts = list(q.prompts) if with_image or q.context is None else [f"{q.context}\n\n{p}" for p in q.prompts]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        worst = int(np.argmax(lengths))
        if before + lengths[worst] + after > context:
            problems.append(
                f"{q.source or q.id}: prompt {worst} takes about {before + lengths[worst] + after} tokens "
                f"with its {'image' if with_image else 'context'}; the model's context is {context}"
            )
    if problems:
        raise problems_error("the questions (nothing was run)", problems)
