"""Where on a film each image soft token looks: the token grid laid over the part of the film the
image processor keeps.

Processors differ in what they keep. Gemma 3's resizes the whole film to its square, so the grid
covers the film. CLIP's (LLaVA-1.5) resizes the shortest edge and crops the centre, so a film that
is not square loses its ends, and the grid covers only the middle. LLaVA's `do_pad` first pads the
film to a square, so part of the grid lies beyond the film. A pixel-budget processor (Qwen2.5-VL)
keeps the whole film and gives it a grid of its own shape (`image_grid_thw`). A `Grid` carries its
`box`: the window of the film it covers, as shares of the film's height and width (beyond 0..1
where the processor pads), so every map, occlusion and overlay lands on the pixels its token read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Float

from flipscope.errors import FlipscopeError

__all__ = ["FULL", "Grid", "seen_box"]

FULL = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Grid:
    """The image soft tokens' grid: `rows` × `cols`, row-major as the projector emits them, over
    `box` = (top, left, bottom, right) of the film, as shares of its height and width."""

    rows: int
    cols: int
    box: tuple[float, float, float, float] = FULL

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols

    def cell_slices(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """The film pixels each cell reads, row-major (cell edges rounded to whole pixels; a cell
        over padding beyond the film reads none)."""
        top, left, bottom, right = self.box
        ys = np.clip(np.linspace(top * height, bottom * height, self.rows + 1).round(), 0, height).astype(int)
        xs = np.clip(np.linspace(left * width, right * width, self.cols + 1).round(), 0, width).astype(int)
        return [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for i in range(self.rows) for j in range(self.cols)]

    def to_pixels(self, cells: Float[np.ndarray, " n_cells"], height: int, width: int) -> Float[np.ndarray, "h w"]:
        """A per-cell map painted onto the film's pixels (for overlays; 0 where no cell looks)."""
        out = np.zeros((height, width))
        for value, (ys, xs) in zip(cells, self.cell_slices(height, width), strict=True):
            out[ys, xs] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "box": list(self.box)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grid:
        return cls(int(data["rows"]), int(data["cols"]), tuple(float(x) for x in data.get("box", FULL)))


def seen_box(image_processor: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """The window of a `height` × `width` film that a resize-to-fixed-size processor's output
    shows, following its own steps: pad to a square (`do_pad`, LLaVA), resize (to `size`'s
    height × width, or its `shortest_edge` keeping the aspect), then crop the centre
    (`do_center_crop` to `crop_size`). As shares of the film's height and width.

    Raises:
        FlipscopeError: the processor cuts a film into several images (Gemma 3's pan and scan).
    """
    if getattr(image_processor, "do_pan_and_scan", False):
        raise FlipscopeError("the image processor's pan and scan cuts a film into several images; evidence maps "
                             "need one image per film (load the model with do_pan_and_scan off)")  # fmt: skip
    top, left, bottom, right = 0.0, 0.0, float(height), float(width)  # the canvas, in film pixels
    if getattr(image_processor, "do_pad", False) and height != width:
        side = max(height, width)
        top, left = -float((side - height) // 2), -float((side - width) // 2)
        bottom, right = top + side, left + side
    canvas_h, canvas_w = bottom - top, right - left
    size = dict(getattr(image_processor, "size", None) or {})
    if "shortest_edge" in size and "height" not in size:
        short, long = sorted((canvas_h, canvas_w))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        new_h, new_w = (new_short, new_long) if canvas_h <= canvas_w else (new_long, new_short)
    else:
        new_h, new_w = size.get("height", canvas_h), size.get("width", canvas_w)
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    if getattr(image_processor, "do_center_crop", False) and crop:
        crop_h, crop_w = crop["height"], crop["width"]
        cut_top, cut_left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        scale_y, scale_x = canvas_h / new_h, canvas_w / new_w
        top, left = top + cut_top * scale_y, left + cut_left * scale_x
        bottom, right = top + crop_h * scale_y, left + crop_w * scale_x
    return (top / height, left / width, bottom / height, right / width)
