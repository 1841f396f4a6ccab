"""Evidence maps checked against the organism's ground truth: its films come with each finding's mask.

On held-out films, for each finding a film shows and the original question answers *yes*, every
method's map (`flipscope.experiments.evidence`) is scored by the pointing game and its mass on the
mask, beside a random map, and by its deletion and insertion areas, beside random orders. Over all
held-out items, the image-evidence share of the margin (`evidence_share`, from the margins with the
film and with the blank) is compared between wordings (the planted family against the first) and
between quadrants. Every figure carries a bootstrap CI over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flipscope.experiments.evidence import (
    METHODS,
    attention_map,
    deletion_insertion,
    evidence_share,
    gradient_maps,
    image_grid,
    occlusion_map,
    pointing,
)
from flipscope.experiments.summary import QUADRANTS, flips, quadrants
from flipscope.model.hooked import HookedVLM
from flipscope.organism.behaviour import MarginTable, margin_table
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Film, question
from flipscope.stats import bootstrap

__all__ = ["evidence_study", "map_scores", "picture_cases", "share_table"]

SCORES = ("hit", "hit_random", "mass", "mass_random", "deletion_area", "insertion_area")


def _maps(vlm: HookedVLM, q: str, pixels: np.ndarray, grid: Any, ig_steps: int) -> dict[str, np.ndarray]:
    gradients = gradient_maps(vlm, q, pixels, steps=ig_steps)
    maps = {"occlusion": occlusion_map(vlm, q, pixels, grid), "attention": attention_map(vlm, q, pixels)}
    return {
        **maps,
        "grad_x_input": gradients["grad_x_input"],
        "integrated_gradients": gradients["integrated_gradients"],
    }


def map_scores(
    vlm: HookedVLM,
    cfg: OrganismConfig,
    films: Sequence[Film],
    *,
    table: MarginTable | None = None,
    n_random: int = 4,
    ig_steps: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Per method, each score's mean with a bootstrap CI over the positive, correctly answered
    findings (read from `table`, the films' `margin_table`, made here when not given); `random`
    holds the random orders' deletion and insertion areas."""
    table = table if table is not None else margin_table(vlm, cfg, films)
    grid = image_grid(vlm)
    rng = np.random.default_rng(seed)
    rows: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SCORES} for m in [*METHODS, "random"]}
    for i in np.flatnonzero(table.truths & (table.margins[:, 0, 0] > 0)):
        film, finding = films[i // len(cfg.findings)], str(table.findings[i])
        q = question(cfg, cfg.families[0].name, 0, finding)
        for method, attribution in _maps(vlm, q, film.pixels, grid, ig_steps).items():
            scores = pointing(attribution, film.masks[finding], grid)
            curves = deletion_insertion(vlm, q, film.pixels, grid, np.argsort(-attribution, kind="stable"))
            for key in SCORES:
                rows[method][key].append(curves[key] if key in curves else scores[key])
        for _ in range(n_random):
            curves = deletion_insertion(vlm, q, film.pixels, grid, rng.permutation(grid.n_cells))
            rows["random"]["deletion_area"].append(curves["deletion_area"])
            rows["random"]["insertion_area"].append(curves["insertion_area"])
    return {
        method: {key: bootstrap(np.array(values), seed=seed).to_dict() for key, values in keys.items() if values}
        for method, keys in rows.items()
    }


def _difference(a: np.ndarray, b: np.ndarray, seed: int, n_boot: int = 2000) -> dict[str, Any]:
    """mean(a) − mean(b) of two independent groups, with a percentile-bootstrap 95% CI (each group
    resampled on its own); all None when a group is empty."""
    if not len(a) or not len(b):
        return {"value": None, "low": None, "high": None, "n": min(len(a), len(b))}
    rng = np.random.default_rng(seed)
    boots = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(n_boot)]
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"value": float(a.mean() - b.mean()), "low": float(low), "high": float(high), "n": min(len(a), len(b))}


def share_table(
    vlm: HookedVLM, cfg: OrganismConfig, films: Sequence[Film], seed: int = 0, table: MarginTable | None = None
) -> dict[str, Any]:
    """The image-evidence share by wording family (mean over each item's wordings of the family)
    and, for the original wording, by the item's quadrant; paired per item, the planted family's
    share minus the first family's; over the (item, paraphrase) pairs that flip, the paraphrase's
    share minus the original's; and Dangerous minus Ideal. Bootstrap CIs over items (pairs).
    `table` is the films' `margin_table` (made here when not given)."""
    table = table if table is not None else margin_table(vlm, cfg, films)
    image, blank = table.margins[:, :, 0], table.margins[:, :, 1]
    share = evidence_share(image, blank)
    answers = image > 0
    quadrant = quadrants(~flips(answers), answers[:, 0] != (blank[:, 0] > 0))
    family = {fam.name: share[:, table.family_columns(fam.name)].mean(1) for fam in cfg.families}
    flipped = answers[:, 1:] != answers[:, :1]
    first, planted = cfg.families[0].name, cfg.shortcut_family
    return {
        "by_family": {name: bootstrap(values, seed=seed).to_dict() for name, values in family.items()},
        "original": bootstrap(share[:, 0], seed=seed).to_dict(),
        "by_quadrant": {q: bootstrap(share[quadrant == q, 0], seed=seed).to_dict() for q in QUADRANTS},
        "planted_minus_first": {
            "planted": planted,
            "first": first,
            **bootstrap(family[planted] - family[first], seed=seed).to_dict(),
        },  # fmt: skip
        "flip_paraphrase_minus_original": bootstrap((share[:, 1:] - share[:, :1])[flipped], seed=seed).to_dict(),
        "dangerous_minus_ideal": _difference(share[quadrant == "Dangerous", 0], share[quadrant == "Ideal", 0], seed),
    }


def picture_cases(
    vlm: HookedVLM, cfg: OrganismConfig, films: Sequence[Film], n_flips: int = 2, table: MarginTable | None = None
) -> list[dict[str, Any]]:
    """Cases to draw (`overlay_figure`): the first `n_flips` items whose planted-family wording flips
    the original, and the first Dangerous item (consistent, the same answer with the blank), each
    as `pair_evidence` of the original and that wording, with the film's pixels. `table` is the
    films' `margin_table` (made here when not given)."""
    from flipscope.experiments.evidence_pairs import pair_evidence

    table = table if table is not None else margin_table(vlm, cfg, films)
    image, blank = table.margins[:, :, 0] > 0, table.margins[:, :, 1] > 0
    quadrant = quadrants(~flips(image), image[:, 0] != blank[:, 0])
    planted = table.family_columns(cfg.shortcut_family)
    items = [films[i // len(cfg.findings)] for i in range(len(table.truths))]
    chosen = [(i, int(planted[np.argmax(image[i, planted] != image[i, 0])]), "flip")
              for i in np.flatnonzero((image[:, planted] != image[:, :1]).any(1))[:n_flips]]  # fmt: skip
    chosen += [(int(i), int(planted[0]), "Dangerous") for i in np.flatnonzero(quadrant == "Dangerous")[:1]]
    grid, cases = image_grid(vlm), []
    for i, column, label in chosen:
        finding = str(table.findings[i])
        original = question(cfg, cfg.families[0].name, 0, finding)
        wording = question(cfg, table.families[column], table.templates[column], finding)
        pixels = items[i].pixels
        cases.append({"label": label, "image": pixels, "original": original, "paraphrase": wording,
                      **pair_evidence(vlm, pixels, original, wording, grid)})  # fmt: skip
    return cases


def evidence_study(
    vlm: HookedVLM, cfg: OrganismConfig, films: Sequence[Film], table: MarginTable | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`map_scores` and `share_table` on the same held-out films, from one `margin_table` of them."""
    table = table if table is not None else margin_table(vlm, cfg, films)
    return {
        "n_films": len(films),
        "methods": map_scores(vlm, cfg, films, table=table, **kwargs),
        "share": share_table(vlm, cfg, films, table=table),
    }
