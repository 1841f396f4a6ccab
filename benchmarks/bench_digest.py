"""What the image memo's key costs per film, beside the tower run it saves, at MedGemma's 896 px.

The memo (`flipscope.model.vision_once`) keys each film by a digest of its pixel values' bytes,
and a suffix run digests a batch's films twice (grouping the rows, then encoding them). A digest
that cost as much as the tower would eat what the memo saves wherever the tower is fast (a GPU),
so this times, side by side in one run, on one 896-px film as the processor gives it:

- `image_digest` as flipscope computes it (XXH3-128 of the bytes, with shape and dtype);
- SHA-256 of the same bytes (what a cryptographic key costs), and XXH3-128 alone;
- each in float32 and bfloat16;
- for scale, one forward of a randomly initialised SigLIP tower at MedGemma 4B's shape (27 layers,
  width 1,152, 4,096 patches) on this CPU (`--no-tower` skips it).

Prints each one's median milliseconds; writes JSON.
Run: `.venv/bin/python benchmarks/bench_digest.py [--repeats 50] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flipscope.data.atomic import write_json  # noqa: E402
from flipscope.model.shapes import MEDGEMMA_4B  # noqa: E402
from flipscope.model.vision_once import image_digest, pixel_bytes  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _tower_ms() -> float:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=MEDGEMMA_4B["vision_d_model"],
        intermediate_size=MEDGEMMA_4B["vision_d_mlp"],
        num_hidden_layers=MEDGEMMA_4B["vision_layers"],
        num_attention_heads=MEDGEMMA_4B["vision_heads"],
        image_size=MEDGEMMA_4B["image_size"],
        patch_size=MEDGEMMA_4B["patch_size"],
    )
    tower = SiglipVisionModel(config).eval()
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        return _median_ms(lambda: tower(pixel_values=pixels), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tower", action="store_true", help="Skip the tower run (minutes on 2 cores).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digest.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = MEDGEMMA_4B["image_size"]
    film = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    found: dict[str, object] = {"machine": platform.processor() or platform.machine(), "threads": args.threads}
    for dtype in (torch.float32, torch.bfloat16):
        image = film.to(dtype)
        ways = {
            "image_digest": lambda image=image: image_digest(image),
            "sha256": lambda image=image: hashlib.sha256(pixel_bytes(image)).digest(),
            "xxh3_128": lambda image=image: xxhash.xxh3_128_digest(pixel_bytes(image)),
        }
        found[str(dtype).removeprefix("torch.")] = {
            "megabytes": image.numel() * image.element_size() / 1e6,
            **{name: _median_ms(fn, args.repeats) for name, fn in ways.items()},
        }
    if not args.no_tower:
        found["tower_ms"] = _tower_ms()
    for key, value in found.items():
        print(f"{key}: {value}")
    write_json(args.out, found)


if __name__ == "__main__":
    main()
