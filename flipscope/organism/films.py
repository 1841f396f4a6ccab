"""Synthetic chest films: a light body, two dark lung fields with texture, a heart shadow, and
findings drawn independently with a severity in 0..1.

Every finding is drawn with enough contrast to be learnable at 64×64 with 8-pixel patches:

- `opacity`: a bright Gaussian blob inside one lung;
- `effusion`: bright fluid filling the base of one lung, with a curved (meniscus) top;
- `cardiomegaly`: the central heart shadow widened well past its normal width;
- `pneumothorax`: a black region without lung texture at the apex of one lung, edged by a thin
  bright pleural line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from jaxtyping import Bool, Float, UInt8
from PIL import Image

from flipscope.errors import FlipscopeError

__all__ = ["FINDING_DRAWERS", "SITES", "FilmStyle", "draw_film"]

Canvas = Float[np.ndarray, "height width"]
Mask = Bool[np.ndarray, "height width"]


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's row and column in [0, 1); read-only, as every film of a size shares it."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    return _frozen(y, x)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> Canvas:
    coarse = rng.normal(size=(scale + 1, scale + 1))
    idx = np.linspace(0, scale, size)
    lo = np.floor(idx).astype(int).clip(0, scale - 1)
    frac = idx - lo
    rows = coarse[lo] * (1 - frac)[:, None] + coarse[lo + 1] * frac[:, None]
    return rows[:, lo] * (1 - frac)[None, :] + rows[:, lo + 1] * frac[None, :]


@lru_cache(maxsize=8)
def _lung_masks(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    left = ((x - 0.31) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 <= 1.0
    right = ((x - 0.69) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 <= 1.0
    return _frozen(left, right)


def _opacity(canvas: Canvas, severity: float, rng: np.random.Generator, lungs: tuple) -> Mask:
    size = canvas.shape[0]
    y, x = _grid(size)
    lung = lungs[rng.integers(2)]
    ys, xs = np.nonzero(lung)
    pick = rng.integers(len(ys))
    cy, cx = ys[pick] / size, xs[pick] / size
    cy = float(np.clip(cy, 0.3, 0.7))
    radius = 0.06 + 0.04 * severity
    blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
    canvas += (0.35 + 0.35 * severity) * blob
    return blob >= np.exp(-2.0)  # within two radii of the centre


def _effusion(canvas: Canvas, severity: float, rng: np.random.Generator, lungs: tuple) -> Mask:
    size = canvas.shape[0]
    y, x = _grid(size)
    side = rng.integers(2)
    lung = lungs[side]
    cx = 0.31 if side == 0 else 0.69
    level = 0.83 - (0.12 + 0.18 * severity)
    meniscus = level - 0.08 * ((x - cx) / 0.17) ** 2
    fluid = lung & (y >= meniscus)
    canvas[fluid] = 0.62 + 0.1 * severity
    return fluid


def _cardiomegaly(canvas: Canvas, severity: float, rng: np.random.Generator, lungs: tuple) -> Mask:
    return _heart(canvas, half_width=0.17 + 0.1 * severity)


def _heart(canvas: Canvas, half_width: float) -> Mask:
    size = canvas.shape[0]
    y, x = _grid(size)
    heart = ((x - 0.53) / half_width) ** 2 + ((y - 0.68) / 0.16) ** 2 <= 1.0
    canvas[heart] = np.maximum(canvas[heart], 0.7)
    return heart


def _pneumothorax(canvas: Canvas, severity: float, rng: np.random.Generator, lungs: tuple) -> Mask:
    size = canvas.shape[0]
    y, x = _grid(size)
    side = rng.integers(2)
    lung = lungs[side]
    depth = 0.2 + 0.2 * severity
    top = 0.17
    region = lung & (y <= top + depth)
    canvas[region] = 0.03
    edge = lung & (np.abs(y - (top + depth)) <= 0.025)
    canvas[edge] = 0.55
    return region | edge


FINDING_DRAWERS: dict[str, Callable[..., None]] = {
    "opacity": _opacity,
    "effusion": _effusion,
    "cardiomegaly": _cardiomegaly,
    "pneumothorax": _pneumothorax,
}


@dataclass(frozen=True)
class FilmStyle:
    """How a site acquires its films: the exposure range, the grain (noise sd) and the field of
    view (below 1 the film is cropped to that share of its width around the centre and scaled
    back, as a tighter collimation shows less of the chest, larger)."""

    name: str = "site1"
    exposure: tuple[float, float] = (0.85, 1.15)
    grain: float = 0.015
    field_of_view: float = 1.0


# The organism's two sites: the one it is trained on, and a second one as PadChest differs from MIMIC.
SITES: dict[str, FilmStyle] = {
    "site1": FilmStyle(),
    "site2": FilmStyle("site2", exposure=(1.05, 1.35), grain=0.04, field_of_view=0.85),
}


def _zoom(image: UInt8[np.ndarray, "h w"], field_of_view: float) -> UInt8[np.ndarray, "h w"]:
    size = image.shape[0]
    keep = max(2, round(size * field_of_view))
    start = (size - keep) // 2
    crop = Image.fromarray(image[start : start + keep, start : start + keep])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def draw_film(
    rng: np.random.Generator,
    severities: Mapping[str, float],
    size: int = 64,
    style: FilmStyle = SITES["site1"],
    masks: dict[str, Mask] | None = None,
) -> UInt8[np.ndarray, "height width"]:
    """One grayscale film; `severities` maps each present finding to a severity in (0, 1]; `style`
    is the site's acquisition (the default site draws exactly what it always drew). With `masks`,
    each present finding's region is written into it (where its drawer painted, on the film's
    grid): the ground truth an evidence map is checked against. Masks draw nothing from `rng`.

    Raises:
        FlipscopeError: a finding has no drawer.
    """
    unknown = sorted(set(severities) - set(FINDING_DRAWERS))
    if unknown:
        raise FlipscopeError(f"no drawer for findings {unknown}; known: {sorted(FINDING_DRAWERS)}")
    y, x = _grid(size)
    # Global draws first, so that a finding changes only its own region of a film drawn from
    # the same seed.
    exposure = rng.uniform(*style.exposure)
    offset = rng.uniform(-0.05, 0.05)
    grain = style.grain * rng.normal(size=(size, size))
    canvas = 0.6 + 0.05 * _smooth_noise(rng, size, 4) - 0.15 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    lungs = _lung_masks(size)
    texture = 0.22 + 0.04 * _smooth_noise(rng, size, 12) + 0.02 * rng.normal(size=(size, size))
    for lung in lungs:
        canvas[lung] = texture[lung]
    heart_width = 0.11 + 0.02 * rng.random()
    drawn: dict[str, Mask] = {}
    if "cardiomegaly" in severities:
        drawn["cardiomegaly"] = _cardiomegaly(canvas, severities["cardiomegaly"], rng, lungs)
    else:
        _heart(canvas, half_width=heart_width)
    for name in ("pneumothorax", "effusion", "opacity"):
        if name in severities:
            drawn[name] = FINDING_DRAWERS[name](canvas, severities[name], rng, lungs)
    if masks is not None:
        for name, mask in drawn.items():
            zoomed = _zoom(mask.astype(np.uint8) * 255, style.field_of_view) if style.field_of_view < 1.0 else None
            masks[name] = mask if zoomed is None else zoomed >= 128
    canvas = canvas * exposure + offset + grain
    film = (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)
    return film if style.field_of_view >= 1.0 else _zoom(film, style.field_of_view)
