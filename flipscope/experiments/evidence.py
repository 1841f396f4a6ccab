"""Image-evidence maps: where in the film a yes−no margin comes from, and whether the map is faithful.

The film is cut into the grid of the model's image soft tokens (Gemma 3: its pooled tokens, e.g.
4×4 on the organism, 16×16 on MedGemma; LLaVA: its CLIP patches; Qwen2.5-VL: its merged patches,
a grid of the film's own shape), row-major as the projector emits them, each cell the block of film
pixels its token reads, over the part of the film the processor keeps (`image_grid`,
`flipscope.model.image_layout`). Per prompt:

- **occlusion**: the margin's drop when one cell is replaced by the blank's gray (128), every cell
  in one batched forward;
- **gradient × input** on the soft tokens, against the blank's soft tokens: (x − x₀) · ∂m/∂x;
- **integrated gradients** from the blank's soft tokens to the film's (`steps` points in one batch);
  their sum is m(film) − m(blank) up to the Riemann error;
- **attention**, for comparison: the answer position's attention to each image token, averaged over
  the language model's layers and heads (run with eager attention for the one forward). It says
  where the model looks, not what moves the margin.

A map is checked two ways. **Faithfulness** (`deletion_insertion`): the margin, in the original
answer's direction, as the top-k cells by the map are blanked (deletion: should fall fast) or
revealed on the blank (insertion: should rise fast), beside random orders. **Ground truth** on the
organism, whose films come with each finding's mask (`pointing`): whether the map's top cell
touches the mask, and the share of its positive mass on the mask, beside what a random map gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.answers import yes_no_margin
from flipscope.model.hooked import HookedVLM
from flipscope.model.image_layout import Grid, seen_box
from flipscope.model.images import load_image
from flipscope.model.prompts import PromptSpec

__all__ = [
    "METHODS",
    "Grid",
    "deletion_insertion",
    "evidence_share",
    "gradient_maps",
    "FilmLayout",
    "film_layout",
    "image_grid",
    "attention_map",
    "occlusion_map",
    "pointing",
]

METHODS = ("occlusion", "grad_x_input", "integrated_gradients", "attention")
FILL = 128  # the gray blank's value: a film with every cell occluded is the blank
PROJECTOR = "projector.hook_out"

Film = UInt8[np.ndarray, "height width *channels"]


def image_grid(vlm: HookedVLM, film: Film | None = None) -> Grid:
    """The grid of `vlm`'s image soft tokens over `film` (default: over the blank of the model's
    own image size; `film_layout` reads it for many films at the cost of one forward).

    Raises:
        FlipscopeError: the model has no projector hook, or its soft tokens are not a square grid.
    """
    return film_layout(vlm).grid(film)


@dataclass(frozen=True)
class FilmLayout:
    """How `vlm`'s processor lays films out as soft tokens (`flipscope.model.image_layout`): a
    pixel-budget processor (Qwen2.5-VL) gives each film its own grid (`side` None); any other
    gives every film a `side` × `side` grid over the window of it that the processor keeps."""

    vlm: HookedVLM
    side: int | None

    def grid(self, film: Film | None = None) -> Grid:
        """`film`'s grid (no forward); with no film, the grid over the model's own blank."""
        if film is None:
            return (
                Grid(self.side, self.side)
                if self.side is not None
                else self.grid(np.asarray(self.vlm.prompts.blank_image))
            )
        if self.side is None:
            thw = self.vlm.prompts.image_inputs([load_image(film)])["image_grid_thw"][0].tolist()
            merge = int(self.vlm.prompts.processor.image_processor.merge_size)
            return Grid(thw[0] * thw[1] // merge, thw[2] // merge)
        return Grid(self.side, self.side, seen_box(self.vlm.prompts.processor.image_processor, *film.shape[:2]))


def film_layout(vlm: HookedVLM) -> FilmLayout:
    """`vlm`'s `FilmLayout`; for a fixed-size processor its side is read from one forward of a
    gray blank."""
    vlm.check_hook_name(PROJECTOR)
    if not vlm.prompts.fixed_layout:
        return FilmLayout(vlm, None)
    batch = vlm.prompts.build([PromptSpec(question="yes", condition="blank")])
    cache = vlm.cache_activations(batch, names_filter=PROJECTOR)
    n_tokens = cache[PROJECTOR].reshape(-1, cache[PROJECTOR].shape[-1]).shape[0]
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise FlipscopeError(f"the model's {n_tokens} image soft tokens are not a square grid")
    return FilmLayout(vlm, side)


def occlude(film: Film, grid: Grid, cells: Sequence[int]) -> Film:
    """`film` with `cells` replaced by the blank's gray (a copy)."""
    return _paste(film, np.full_like(film, FILL), grid, cells)


def _paste(target: Film, source: Film, grid: Grid, cells: Sequence[int]) -> Film:
    """A copy of `target` with `cells` taken from `source` (occluding: gray into the film; revealing:
    the film into the blank)."""
    out = target.copy()
    slices = grid.cell_slices(*target.shape[:2])
    for cell in cells:
        out[slices[cell]] = source[slices[cell]]
    return out


@torch.no_grad()
def _margins(vlm: HookedVLM, question: str, films: Sequence[Film], batch_size: int) -> Float[np.ndarray, " n"]:
    specs = [PromptSpec(question=question, image=f) for f in films]
    out = [vlm.score(vlm.prompts.build(specs[i : i + batch_size])) for i in range(0, len(specs), batch_size)]
    return torch.cat(out).double().numpy()


def occlusion_map(
    vlm: HookedVLM, question: str, film: Film, grid: Grid, *, batch_size: int = 64
) -> Float[np.ndarray, " n_cells"]:
    """Per cell, m(film) − m(film with that cell blanked): the film and every occlusion in one batch
    (or batches of `batch_size`)."""
    films = [film] + [occlude(film, grid, [cell]) for cell in range(grid.n_cells)]
    margins = _margins(vlm, question, films, batch_size)
    return margins[0] - margins[1:]


def gradient_maps(
    vlm: HookedVLM, question: str, film: Film, *, steps: int = 16
) -> dict[str, Float[np.ndarray, " n_cells"]]:
    """Gradient × input and integrated gradients over the image soft tokens (module docstring), and
    `ig_total` = their sum next to `delta` = m(film) − m(blank), the completeness check."""
    with torch.no_grad():
        gray = np.full_like(film, FILL)  # the film's own size: a pixel-budget processor gives it the same grid
        specs = [PromptSpec(question=question, image=film), PromptSpec(question=question, image=gray)]
        batch = vlm.prompts.build(specs)
        cache = vlm.cache_activations(batch, names_filter=PROJECTOR)
        x, x0 = cache[PROJECTOR].float().reshape(2, -1, cache[PROJECTOR].shape[-1])  # Qwen2.5-VL's come flat
    alphas = torch.linspace(1.0 / steps, 1.0, steps)[:, None, None]  # right Riemann sum; alpha = 1 is the film
    path = (x0 + alphas * (x - x0)).requires_grad_(True)

    def replace(activation: Tensor, hook: object) -> Tensor:
        return path.to(activation.dtype).reshape(activation.shape)

    inputs = vlm.prompts.build([PromptSpec(question=question, image=film)] * steps)
    with torch.enable_grad(), vlm.hooks([(PROJECTOR, replace)]):
        logits = vlm(inputs, logits_to_keep=1)
        margins = yes_no_margin(logits[:, -1].float(), vlm.answer_tokens)
        (grads,) = torch.autograd.grad(margins.sum(), path)
    diff = (x - x0).double()
    ig = (diff * grads.double().mean(0)).sum(-1).numpy()
    gxi = (diff * grads[-1].double()).sum(-1).numpy()
    blank = _margins(vlm, question, [gray], 1)[0]
    return {"grad_x_input": gxi, "integrated_gradients": ig, "ig_total": float(ig.sum()),
            "delta": float(margins[-1].detach()) - float(blank)}  # fmt: skip


@torch.no_grad()
def attention_map(vlm: HookedVLM, question: str, film: Film) -> Float[np.ndarray, " n_cells"]:
    """The last prompt position's attention to each image token, mean over layers and heads (the
    patterns of `blocks.{L}.attn.hook_pattern`)."""
    from flipscope.model.families import image_token_mask
    from flipscope.model.hook_names import attn_pattern

    batch = vlm.prompts.build([PromptSpec(question=question, image=film)])
    positions = torch.nonzero(image_token_mask(vlm.hf_model, batch.input_ids)[0]).flatten()
    if len(positions) == 0:
        raise FlipscopeError("the prompt holds no image tokens: there is no attention to the film to map")
    names = [attn_pattern(layer) for layer in range(vlm.n_layers)]
    patterns = vlm.cache_activations(batch, names_filter=names, positions="last")  # [1, head, key] each
    weights = torch.stack([patterns[name][0][:, positions].float().mean(0) for name in names])
    return weights.mean(0).double().numpy()


def evidence_share(
    m_film: float | Float[np.ndarray, "*shape"], m_blank: float | Float[np.ndarray, "*shape"]
) -> float | Float[np.ndarray, "*shape"]:
    """How much of the margin the film accounts for beside the text prior: |m(film) − m(blank)| over
    |m(film) − m(blank)| + |m(blank)| (0: the answer is the prior's; 1: all of it is the film's);
    elementwise on arrays."""
    film, blank = np.asarray(m_film, dtype=np.float64), np.asarray(m_blank, dtype=np.float64)
    image, prior = np.abs(film - blank), np.abs(blank)
    total = image + prior
    share = np.divide(image, total, out=np.zeros_like(total), where=total > 0)
    return float(share) if share.ndim == 0 else share


def deletion_insertion(
    vlm: HookedVLM,
    question: str,
    film: Film,
    grid: Grid,
    order: Sequence[int] | Int[np.ndarray, " n_cells"],
    *,
    batch_size: int = 64,
) -> dict[str, Float[np.ndarray, " k"]]:
    """The margin in the original answer's direction, scaled by its size, as the first k cells of
    `order` are blanked (`deletion`) or revealed on the blank (`insertion`), k = 0..n_cells; and
    each curve's area (mean over k)."""
    n = grid.n_cells
    order = [int(cell) for cell in order]
    if sorted(order) != list(range(n)):
        raise FlipscopeError(f"order must list every cell 0..{n - 1} once")
    blank = np.full_like(film, FILL)
    deleted = [occlude(film, grid, order[:k]) for k in range(n + 1)]
    inserted = [_paste(blank, film, grid, order[:k]) for k in range(n + 1)]
    margins = _margins(vlm, question, deleted + inserted, batch_size)
    sign = 1.0 if margins[0] > 0 else -1.0
    scale = max(abs(margins[0]), 1e-6)
    deletion, insertion = sign * margins[: n + 1] / scale, sign * margins[n + 1 :] / scale
    return {"deletion": deletion, "insertion": insertion,
            "deletion_area": float(deletion.mean()), "insertion_area": float(insertion.mean())}  # fmt: skip


def pointing(
    attribution: Float[np.ndarray, " n_cells"], mask: Bool[np.ndarray, "height width"], grid: Grid
) -> dict[str, float]:
    """Against a finding's mask: `hit` (the top cell touches it), `mass` (the share of positive
    attribution on it, weighted by each cell's coverage), and what a random map gets for each
    (`hit_random`: the share of cells that touch the mask; `mass_random`: the mean coverage)."""
    coverage = np.array([mask[ys, xs].mean() for ys, xs in grid.cell_slices(*mask.shape)])
    positive = np.clip(attribution, 0, None)
    mass = float((positive * coverage).sum() / positive.sum()) if positive.sum() > 0 else 0.0
    return {"hit": float(coverage[int(np.argmax(attribution))] > 0), "mass": mass,
            "hit_random": float((coverage > 0).mean()), "mass_random": float(coverage.mean())}  # fmt: skip
