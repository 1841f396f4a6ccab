"""Loading images for the model and making the stand-ins used when the image is removed.

Chest films arrive as 8-bit grayscale, RGB, RGBA or 16-bit PNGs. Everything is converted to
8-bit RGB, which is what the Gemma 3 image processor expects:
- 16-bit (and 32-bit integer) images are windowed linearly from their own min..max into 0..255,
  because 12-bit data stored in 16 bits would otherwise be nearly black;
- RGBA is composited onto black (the background of a film), then alpha is dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

from flipscope.errors import FlipscopeError

__all__ = ["BlankKind", "BlankSpec", "ImageLike", "blank_image", "load_image"]

BlankKind = Literal["gray", "white", "noise"]
ImageLike = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True, kw_only=True)
class BlankSpec:
    """What replaces the image in the `blank` condition.

    Attributes:
        kind: `gray` (uniform 128, the default), `white` (uniform 255) or `noise` (Gaussian,
            mean 128, sd 64, clipped to 0..255; the paper found results within 2% of gray).
        seed: Seed of the noise image (ignored for gray and white).
    """

    kind: str = "gray"  # a BlankKind; validated here so user input gets a clear error
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in get_args(BlankKind):
            raise FlipscopeError(f"blank kind {self.kind!r} is not one of {', '.join(get_args(BlankKind))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlankSpec:
        return cls(**data)


def blank_image(spec: BlankSpec, size: tuple[int, int]) -> Image.Image:
    """A blank RGB image of `size` (width, height) as described by `spec`."""
    width, height = size
    if spec.kind == "noise":
        rng = np.random.default_rng(spec.seed)
        gray = np.clip(rng.normal(128.0, 64.0, size=(height, width)), 0, 255).round().astype(np.uint8)
    else:
        gray = np.full((height, width), 128 if spec.kind == "gray" else 255, dtype=np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """An 8-bit RGB PIL image from a path, a PIL image or a numpy array (H×W or H×W×C).

    Raises:
        FlipscopeError: the path does not exist or is not a readable image.
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise FlipscopeError(
                f"image array has shape {image.shape}; expected (height, width) or (height, width, channels)"
            )
        if image.dtype == np.uint16 and image.ndim == 2:
            return _to_rgb(Image.fromarray(image))
        return _to_rgb(Image.fromarray(image))
    path = Path(image)
    if not path.is_file():
        raise FlipscopeError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_rgb(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise FlipscopeError(f"image file {str(path)!r} is not a readable image ({err})") from err
