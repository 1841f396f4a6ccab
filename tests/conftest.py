"""Shared fixtures: a tiny Gemma 3 VLM written to disk and loaded back as a user would."""

from __future__ import annotations

from flipscope.kernels import prefer_portable

# Before torch loads (here, and in each xdist worker, which inherits the environment): organisms and
# SAEs trained in the suite are then their recipe's bits on any x86-64 CPU with AVX2, as the
# recorded numbers are (flipscope/kernels.py). A setting already in the environment is kept.
prefer_portable()

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipscope.model import HookedVLM
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm

WORDS = (
    "yes", "no", "is", "there", "a", "an", "any", "effusion", "opacity", "pleural", "the", "lungs",
    "clear", "are", "do", "you", "see", "in", "this", "film", "?", ",", ".",
)  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-demo",
        action="store_true",
        help="Write the demo's values to tests/data/demo_expected.json instead of comparing with them.",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The costliest modules first (`costly(seconds)`, their time on two cores), the rest as
    collected: with `--dist loadfile --no-loadscope-reorder` each worker then starts on a long
    module and the two finish together, instead of one running a long module alone at the end."""

    def cost(item: pytest.Item) -> float:
        mark = item.get_closest_marker("costly")
        return -float(mark.args[0]) if mark else 0.0

    items.sort(key=cost)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vlm(TinyVLMConfig(words=WORDS, seed=1), tmp_path_factory.mktemp("tiny") / "tiny-vlm")


@pytest.fixture(scope="session")
def vlm(tiny_dir: Path) -> HookedVLM:
    return HookedVLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def film_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synthetic film saved as grayscale, RGB, RGBA and 16-bit PNG, plus a corrupt file."""
    root = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, size=(40, 36), dtype=np.uint8)
    paths = {
        "gray": root / "gray.png",
        "rgb": root / "rgb.png",
        "rgba": root / "rgba.png",
        "gray16": root / "gray16.png",
        "corrupt": root / "corrupt.png",
        "other": root / "other.png",
    }
    Image.fromarray(gray).save(paths["gray"])
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(paths["rgb"])
    rgba = np.concatenate([np.repeat(gray[:, :, None], 3, axis=2), np.full((40, 36, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(paths["rgba"])
    Image.fromarray(gray.astype(np.uint16) * 257).save(paths["gray16"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.fromarray(rng.integers(0, 256, size=(40, 36), dtype=np.uint8)).save(paths["other"])
    return paths
