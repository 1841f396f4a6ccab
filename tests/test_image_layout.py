"""Each grid cell lands on the pixels its soft token reads, for every kind of image processor and
films of any shape: perturbing the film inside one cell changes that cell's token's input most, and
a film's pixels that the processor crops away change nothing. Then the evidence maps of a LLaVA and
a Qwen2.5-VL model on films that are not square: one value per soft token of that film, and a
crop-away region that moves no margin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flipscope.experiments.evidence import (
    FILL,
    PROJECTOR,
    attention_map,
    film_layout,
    gradient_maps,
    image_grid,
    occlude,
    occlusion_map,
)
from flipscope.model.hooked import HookedVLM
from flipscope.model.image_layout import Grid, seen_box
from flipscope.model.prompts import PromptSpec
from flipscope.model.tiny import TinyVLMConfig
from flipscope.model.tiny_families import save_tiny
from tests.conftest import WORDS

SHAPES = [(40, 48), (112, 56), (60, 200), (56, 56)]  # (height, width): wide, tall, very wide, square
HALF = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
FIXED = {
    "clip-crop": CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, **HALF),
    "llava-pad": LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, **HALF
    ),
    "gemma3": Gemma3ImageProcessorPil(size={"height": 64, "width": 64}, **HALF),
}


def _film(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _per_token_change(before: torch.Tensor, after: torch.Tensor, grid: Grid) -> np.ndarray:
    """|Δ| of a processed image summed over each soft token's block of it (row-major)."""
    diff = (after - before).abs()[0].sum(0)  # [height, width] of the processed image
    h, w = diff.shape[0] // grid.rows, diff.shape[1] // grid.cols
    return diff.reshape(grid.rows, h, grid.cols, w).sum((1, 3)).flatten().numpy()


@pytest.mark.parametrize("name", list(FIXED))
@pytest.mark.parametrize("shape", SHAPES)
def test_a_cell_of_a_fixed_size_processor_is_its_token_block(name: str, shape: tuple[int, int]) -> None:
    processor, film = FIXED[name], _film(shape)
    grid = Grid(4, 4, seen_box(processor, *shape))
    base = processor(images=[Image.fromarray(film)], return_tensors="pt")["pixel_values"]
    for cell, (ys, xs) in enumerate(grid.cell_slices(*shape)):
        if ys.stop - ys.start < 3 or xs.stop - xs.start < 3:  # over padding, or a sliver: no token reads it alone
            continue
        changed = film.copy()
        changed[ys, xs] = 255 - changed[ys, xs]
        after = processor(images=[Image.fromarray(changed)], return_tensors="pt")["pixel_values"]
        assert int(np.argmax(_per_token_change(base, after, grid))) == cell, (name, shape, cell)
    if name == "clip-crop" and shape[0] != shape[1]:  # the film's ends are cropped away: changing them is invisible
        top, left, bottom, right = (np.array(grid.box) * [*shape, *shape]).round().astype(int)
        far = np.ones(shape, dtype=bool)
        far[max(top - 2, 0) : bottom + 2, max(left - 2, 0) : right + 2] = False  # the resize kernel's reach
        changed = film.copy()
        changed[far] = 255 - changed[far]
        after = processor(images=[Image.fromarray(changed)], return_tensors="pt")["pixel_values"]
        assert far.any() and torch.equal(after, base)


def test_a_processor_that_cuts_a_film_into_several_images_is_refused() -> None:
    from flipscope.errors import FlipscopeError

    panning = Gemma3ImageProcessorPil(size={"height": 64, "width": 64}, do_pan_and_scan=True, **HALF)
    with pytest.raises(FlipscopeError, match="pan and scan cuts a film into several images"):
        seen_box(panning, 40, 200)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_pixel_budget_processor_gives_each_film_its_own_grid(shape: tuple[int, int]) -> None:
    processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56 // 4, max_pixels=112 * 112, **HALF
    )
    film = _film(shape)
    out = processor(images=[Image.fromarray(film)], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    grid = Grid(t * h // 2, w // 2)
    for cell, (ys, xs) in enumerate(grid.cell_slices(*shape)):
        changed = film.copy()
        changed[ys, xs] = 255 - changed[ys, xs]
        after = processor(images=[Image.fromarray(changed)], return_tensors="pt")["pixel_values"]
        per_token = (after - out["pixel_values"]).abs().sum(1).reshape(-1, 4).sum(1)  # 2 × 2 patches a token
        assert int(torch.argmax(per_token)) == cell, (shape, cell)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HookedVLM]:
    root = tmp_path_factory.mktemp("layout")
    cfg = TinyVLMConfig(words=WORDS, seed=2, image_size=56, patch_size=14, mm_tokens_per_image=4)
    return {family: HookedVLM.from_pretrained(save_tiny(family, cfg, Path(root) / family))
            for family in ("llava", "qwen2_5_vl")}  # fmt: skip


def _n_tokens(vlm: HookedVLM, film: np.ndarray) -> int:
    _, cache = vlm.run_with_cache(vlm.prompts.build([PromptSpec(question="yes", image=film)]), names_filter=PROJECTOR)
    return cache[PROJECTOR].reshape(-1, cache[PROJECTOR].shape[-1]).shape[0]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_evidence_maps_of_a_film_that_is_not_square_have_one_cell_per_token(models, family: str) -> None:
    vlm = models[family]
    layout = film_layout(vlm)
    for shape in SHAPES[:3]:
        film = _film(shape, seed=1)
        grid = layout.grid(film)
        assert grid == image_grid(vlm, film) and grid.n_cells == _n_tokens(vlm, film), (family, shape, grid)
        assert occlusion_map(vlm, "is there an effusion ?", film, grid).shape == (grid.n_cells,)
        maps = gradient_maps(vlm, "is there an effusion ?", film, steps=8)
        assert maps["integrated_gradients"].shape == (grid.n_cells,) and np.isfinite(maps["ig_total"])
        assert attention_map(vlm, "is there an effusion ?", film).shape == (grid.n_cells,)
    assert (layout.side is None) == (family == "qwen2_5_vl")
    if family == "llava":  # the centre crop: the ends of a tall film move no margin
        film, grid = _film((112, 56), seed=1), layout.grid(_film((112, 56)))
        assert grid.box == (0.25, 0.0, 0.75, 1.0)
        ends = film.copy()
        ends[:20], ends[-20:] = FILL, FILL
        specs = [PromptSpec(question="is there an effusion ?", image=f) for f in (film, ends, occlude(film, grid, [5]))]
        m = vlm.score(vlm.prompts.build(specs))
        assert m[1] == m[0] and m[2] != m[0]
