"""When a paraphrase flips the answer, did the model stop using the film, or use it differently?

For every FlipBank case with a film, the occlusion map (`occlusion_map`) of the original and of the
paraphrase on the same film, and each one's image-evidence share (`evidence_share`, from the
margins with the film and with the blank). *Stopped using it*: the paraphrase's share falls.
*Used it differently*: the two maps point elsewhere (their cosine falls). Flips are set beside the
bank's same-wording non-flip controls, each with a bootstrap CI over cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from flipscope.data.store import iter_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.evidence import FILL, evidence_share, film_layout, occlusion_map
from flipscope.experiments.pairs import bank_cases
from flipscope.experiments.summary import question_table
from flipscope.model.hooked import HookedVLM
from flipscope.model.image_layout import Grid
from flipscope.model.images import load_image
from flipscope.model.prompts import PromptSpec
from flipscope.stats import bootstrap

__all__ = ["flip_evidence", "pair_evidence", "run_shares"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def pair_evidence(vlm: HookedVLM, film: np.ndarray, original: str, paraphrase: str, grid: Grid) -> dict[str, Any]:
    """Both wordings' occlusion maps on `grid` (the film's, `image_grid`) on one film, their cosine,
    and each one's share of its margin drawn from the film."""
    blank = np.full_like(film, FILL)
    specs = [PromptSpec(question=q, image=image) for q in (original, paraphrase) for image in (film, blank)]
    m = vlm.score(vlm.prompts.build(specs)).double().numpy()
    maps = [occlusion_map(vlm, q, film, grid) for q in (original, paraphrase)]
    return {
        "grid": grid.to_dict(), "map_original": maps[0].round(6).tolist(), "map_paraphrase": maps[1].round(6).tolist(),
        "cosine": _cosine(*maps), "margin_original": float(m[0]), "margin_paraphrase": float(m[2]),
        "share_original": evidence_share(float(m[0]), float(m[1])),
        "share_paraphrase": evidence_share(float(m[2]), float(m[3])),
    }  # fmt: skip


def flip_evidence(
    vlm: HookedVLM, bank: Mapping[str, Any], *, max_cases: int | None = None, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """`pair_evidence` for the bank's cases (flips first, then controls; at most `max_cases` of
    each), each on its film's grid, and per kind the mean map cosine and the paraphrase-minus-original
    share with CIs.

    Raises:
        FlipscopeError: no case of the bank has a film.
    """
    layout = film_layout(vlm)
    cases, is_flip = bank_cases(bank)
    chosen = [(c, bool(f)) for c, f in zip(cases, is_flip, strict=True) if c.get("image") is not None]
    if max_cases is not None:
        chosen = [x for x in chosen if x[1]][:max_cases] + [x for x in chosen if not x[1]][:max_cases]
    if not chosen:
        raise FlipscopeError("the FlipBank has no case with a film; image-evidence maps need one")
    rows = []
    for case, flip in tqdm(chosen, desc="evidence maps", disable=not progress):
        film = np.asarray(load_image(case["image"]))
        maps = pair_evidence(vlm, film, case["original"], case["paraphrase"], layout.grid(film))
        rows.append({"flip": flip, "image": str(case["image"]), "original": case["original"],
                     "paraphrase": case["paraphrase"], **maps})  # fmt: skip
    summary = {}
    for kind, wanted in (("flips", True), ("controls", False)):
        picked = [r for r in rows if r["flip"] == wanted]
        summary[kind] = {
            "n": len(picked),
            "cosine": _estimate([r["cosine"] for r in picked], seed),
            "share_change": _estimate([r["share_paraphrase"] - r["share_original"] for r in picked], seed),
        }
    return {"summary": summary, "cases": rows}


def run_shares(path: str | Path, seed: int = 0) -> dict[str, Any]:
    """The image-evidence share of every answer in an evaluation store run with the image and the
    blank, read from its margins (no model needed): by paraphrase family (`original` for the
    original wording), by the question's quadrant (the original wording), and, over the
    (question, paraphrase) pairs that flip, the paraphrase's share minus the original's.

    Raises:
        FlipscopeError: the run has no image and blank margins to compare.
    """
    margins: dict[tuple[str, int, str], float] = {}
    strategy: dict[tuple[str, int], str] = {}
    for row in iter_rows(path):
        if row.get("margin") is not None:
            margins[(row["question_id"], row["prompt_index"], row["condition"])] = float(row["margin"])
            strategy[(row["question_id"], row["prompt_index"])] = row.get("strategy") or (
                "original" if row["prompt_index"] == 0 else "untagged"
            )
    table = question_table(iter_rows(path))
    shares: dict[tuple[str, int], float] = {
        key: evidence_share(margins[(*key, "image")], margins[(*key, "blank")])
        for key in strategy if (*key, "image") in margins and (*key, "blank") in margins
    }  # fmt: skip
    if not shares:
        raise FlipscopeError(f"{path}: no prompt has margins with both the image and the blank; evaluate with "
                             "--conditions image,blank")  # fmt: skip
    families: dict[str, list[float]] = {}
    for key, value in shares.items():
        families.setdefault(strategy[key], []).append(value)
    by_quadrant: dict[str, list[float]] = {}
    flip_change = []
    for q, entry in table.items():
        if (q, 0) not in shares:
            continue
        by_quadrant.setdefault(entry["quadrant"] or "unknown", []).append(shares[(q, 0)])
        flip_change += [shares[(q, k)] - shares[(q, 0)] for k, flipped in entry["paraphrase_flips"].items()
                        if flipped and (q, k) in shares]  # fmt: skip
    return {
        "by_family": {name: _estimate(values, seed) for name, values in families.items()},
        "by_quadrant": {name: _estimate(values, seed) for name, values in by_quadrant.items()},
        "flip_paraphrase_minus_original": _estimate(flip_change, seed),
    }


def _estimate(values: list[float], seed: int) -> dict[str, Any]:
    """A bootstrap estimate; with no values, Nones (never NaN: the result is strict JSON)."""
    if not values:
        return {"value": None, "low": None, "high": None, "n": 0}
    return bootstrap(np.array(values, dtype=np.float64), seed=seed).to_dict()
