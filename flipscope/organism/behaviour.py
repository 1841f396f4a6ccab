"""The organism's measured behaviour on held-out films: what the ground-truth card records.

Each test item is one film × one finding. Every template of every family is asked with the film
and with the gray blank; the original question is the first template of the first family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from flipscope.experiments.summary import QUADRANTS, flips, quadrants
from flipscope.model.answers import binary_entropy
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Film, question
from flipscope.stats import bootstrap

__all__ = ["MarginTable", "margin_table", "summarize"]

CONDITIONS = ("image", "blank")


@dataclass(frozen=True)
class MarginTable:
    """Margins of every item × prompt × condition, with what each axis holds."""

    margins: Float[np.ndarray, "n_items n_prompts n_conditions"]
    findings: np.ndarray
    truths: np.ndarray
    families: tuple[str, ...]
    templates: tuple[int, ...]

    def family_columns(self, family: str) -> np.ndarray:
        return np.array([i for i, f in enumerate(self.families) if f == family])


@torch.no_grad()
def margin_table(vlm: HookedVLM, cfg: OrganismConfig, films: list[Film], batch_size: int = 256) -> MarginTable:
    """Score every film × finding × template × condition."""
    prompts = [(fam.name, t) for fam in cfg.families for t in range(len(fam.templates))]
    items = [(film, f.name) for film in films for f in cfg.findings]
    specs = [
        PromptSpec(question=question(cfg, fam, t, finding), condition=cond, image=film.pixels)
        for film, finding in items
        for fam, t in prompts
        for cond in CONDITIONS
    ]
    margins = torch.cat(
        [vlm.score(vlm.prompts.build(specs[i : i + batch_size])) for i in range(0, len(specs), batch_size)]
    )
    return MarginTable(
        margins=margins.numpy().reshape(len(items), len(prompts), len(CONDITIONS)),
        findings=np.array([finding for _, finding in items]),
        truths=np.array([film.shows(finding) for film, finding in items]),
        families=tuple(fam for fam, _ in prompts),
        templates=tuple(t for _, t in prompts),
    )


def _share(mask: np.ndarray) -> float | None:
    """Mean of a boolean mask; None (not NaN, so the card stays strict JSON) when it is empty."""
    return float(mask.mean()) if mask.size else None


def summarize(table: MarginTable, cfg: OrganismConfig) -> dict:
    """The card's behaviour block (shares in 0..1; None where a share has no items).

    An item flips when any prompt's answer differs from the original question's (with the
    image); `flips_by_family` is the share of items a family's own wordings flip (the first
    family: its other templates), and `flips_by_direction` counts flipped items by the original
    answer.
    """
    image = table.margins[:, :, 0] > 0
    blank = table.margins[:, :, 1] > 0
    truth = table.truths[:, None]
    neutral = table.family_columns(cfg.families[0].name)
    shortcut = table.family_columns(cfg.shortcut_family)
    target = cfg.shortcut_target == "yes"

    flipped = flips(image)
    by_shortcut = (image[:, shortcut] != image[:, :1]).any(axis=1)
    consistent = ~flipped
    reliant = image[:, 0] != blank[:, 0]
    quadrant = quadrants(consistent, reliant)
    entropy = binary_entropy(torch.from_numpy(table.margins[:, 0, 0])).numpy()
    correct = image[:, 0] == table.truths
    findings = [f.name for f in cfg.findings]
    opposite = table.truths != target

    return {
        "n_items": int(len(table.truths)),
        "n_flips": int(flipped.sum()),
        "flip_rate_ci": bootstrap(flipped, seed=cfg.seed).to_dict(),
        "flips_by_family": {
            fam.name: _share((image[:, table.family_columns(fam.name)] != image[:, :1]).any(axis=1))
            for fam in cfg.families
        },
        "flips_by_direction": {
            "yes→no": int((flipped & image[:, 0]).sum()),
            "no→yes": int((flipped & ~image[:, 0]).sum()),
        },
        "neutral_accuracy": _share(image[:, neutral] == truth),
        "neutral_accuracy_by_finding": {
            f: _share(image[table.findings == f][:, neutral] == truth[table.findings == f]) for f in findings
        },
        "accuracy_by_family": {
            fam.name: _share(image[:, table.family_columns(fam.name)] == truth) for fam in cfg.families
        },
        "shortcut_target_rate_on_opposite_truth": _share(image[opposite][:, shortcut] == target),
        "flip_rate": _share(flipped),
        "flips_involving_shortcut": _share(by_shortcut[flipped]),
        "flip_share_by_finding": {f: _share(table.findings[flipped] == f) for f in findings},
        "blank_change_neutral": _share(image[:, neutral] != blank[:, neutral]),
        "blank_change_shortcut": _share(image[:, shortcut] != blank[:, shortcut]),
        "text_only_agreement": _share(~reliant),
        "quadrants": {
            q: {
                "share": _share(quadrant == q),
                "accuracy": _share(correct[quadrant == q]),
                "mean_entropy_bits": float(entropy[quadrant == q].mean()) if (quadrant == q).any() else None,
            }
            for q in QUADRANTS
        },
    }
