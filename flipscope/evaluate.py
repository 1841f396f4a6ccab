"""Flip and quadrant evaluation over a table of answers.

Definitions (PSF-Med): a question **flips** when the answer to any paraphrase differs from the
answer to the original; it is **consistent** when it does not flip. It is **image-reliant** when
its answer to the original changes when the image is removed. The four quadrants:

| | image-reliant | not image-reliant |
| --- | --- | --- |
| consistent | Ideal | Dangerous |
| inconsistent | Fragile | Worst |

Dangerous items are the trap: consistent and often accurate, but answered from the text alone.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float

__all__ = ["QUADRANTS", "flips", "pairwise_disagreement", "quadrants"]

QUADRANTS: tuple[str, ...] = ("Ideal", "Fragile", "Dangerous", "Worst")


def flips(answers: Bool[np.ndarray, "n_items n_prompts"], original: int = 0) -> Bool[np.ndarray, " n_items"]:
    """Whether any prompt's answer differs from the original prompt's (column `original`)."""
    return (answers != answers[:, original : original + 1]).any(axis=1)


def pairwise_disagreement(answers: Bool[np.ndarray, "n_items n_prompts"]) -> Float[np.ndarray, " n_items"]:
    """Share of unordered prompt pairs whose answers differ, per item."""
    k = answers.shape[1]
    yes = answers.sum(axis=1)
    return (yes * (k - yes)) / (k * (k - 1) / 2)


def quadrants(consistent: Bool[np.ndarray, " n_items"], reliant: Bool[np.ndarray, " n_items"]) -> np.ndarray:
    """Quadrant name per item (see the module docstring)."""
    names = np.empty(consistent.shape, dtype=object)
    names[consistent & reliant] = "Ideal"
    names[~consistent & reliant] = "Fragile"
    names[consistent & ~reliant] = "Dangerous"
    names[~consistent & ~reliant] = "Worst"
    return names
