"""What an image-evidence map costs, side by side in one run.

Random Gemma 3 VLMs with MedGemma's 262,208-token vocabulary, at two geometries (`bench_eval.CONFIGS`):
the organism's 64-px films with 16 soft tokens, and MedGemma's 896-px films with 256 (a smaller
tower and language model). Per model, each path is repeated and interleaved so drift hits all alike:

- `occlusion`: `occlusion_map` — the film and every occluded copy in batches of `--batch`;
- `occlusion-unbatched`: the same margins, one forward per occluded copy (the naive loop);
- `ig`: `gradient_maps` (gradient × input and integrated gradients, `--steps` points in one batch).

At 896 px a full 16×16 occlusion is 257 films; the benchmark occludes a coarser `--coarse`-cell
grid there and reports the seconds per film, from which a full map's cost follows.
Prints medians and ratios; writes JSON.
Run: `.venv/bin/python benchmarks/bench_evidence.py [--repeats 3] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_eval import CONFIGS, VOCAB, WORDS  # noqa: E402

from flipscope.data.atomic import write_json
from flipscope.experiments.evidence import Grid, gradient_maps, image_grid, occlude, occlusion_map  # noqa: E402
from flipscope.model import HookedVLM, PromptSpec  # noqa: E402
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm  # noqa: E402

QUESTION = "Is there an effusion?"


def _unbatched(vlm: HookedVLM, film: np.ndarray, grid: Grid) -> np.ndarray:
    films = [film] + [occlude(film, grid, [cell]) for cell in range(grid.n_cells)]
    margins = np.array(
        [float(vlm.score(vlm.prompts.build([PromptSpec(question=QUESTION, image=f)]))[0]) for f in films]
    )
    return margins[0] - margins[1:]


def run_config(name: str, args: argparse.Namespace) -> dict:
    config = TinyVLMConfig(words=WORDS, vocab_size=args.vocab, **CONFIGS[name])
    with tempfile.TemporaryDirectory() as tmp:
        vlm = HookedVLM.from_pretrained(save_tiny_vlm(config, Path(tmp) / "bench-vlm"))
    native = image_grid(vlm)
    grid = native if native.n_cells <= 16 else Grid(args.coarse, args.coarse)
    film = np.random.default_rng(0).integers(0, 256, (config.image_size,) * 2, dtype=np.uint8)
    paths = {
        "occlusion": lambda: occlusion_map(vlm, QUESTION, film, grid, batch_size=args.batch),
        "occlusion-unbatched": lambda: _unbatched(vlm, film, grid),
        "ig": lambda: gradient_maps(vlm, QUESTION, film, steps=args.steps),
    }
    times: dict[str, list[float]] = {p: [] for p in paths}
    results = {}
    for _ in range(args.repeats):
        for path, fn in paths.items():
            start = time.perf_counter()
            results[path] = fn()
            times[path].append(time.perf_counter() - start)
    agree = float(np.abs(results["occlusion"] - results["occlusion-unbatched"]).max())
    medians = {p: float(np.median(t)) for p, t in times.items()}
    films = grid.n_cells + 1
    return {
        "config": name, "image_size": config.image_size, "native_grid": [native.rows, native.cols],
        "occluded_grid": [grid.rows, grid.cols], "seconds": medians,
        "ratio_to_batched": {p: medians[p] / medians["occlusion"] for p in medians},
        "seconds_per_film": medians["occlusion"] / films,
        "full_occlusion_map_seconds": medians["occlusion"] / films * (native.n_cells + 1),
        "batched_vs_unbatched_max_abs_diff": agree,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="gemma-270m-geometry,medgemma-vision")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--batch", type=int, default=17)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--coarse", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evidence.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [run_config(name, args) for name in args.configs.split(",")]
    for run in runs:
        ratios = ", ".join(f"{p} {r:.2f}x" for p, r in run["ratio_to_batched"].items())
        print(f"{run['config']} ({run['image_size']} px, occluding {run['occluded_grid']}): {ratios}; "
              f"{run['seconds_per_film']:.3f} s per film, a full {run['native_grid']} occlusion map "
              f"{run['full_occlusion_map_seconds']:.1f} s; batched = unbatched within "
              f"{run['batched_vs_unbatched_max_abs_diff']:.1e}")  # fmt: skip
    out = {"machine": platform.machine(), "processor": platform.processor(), "threads": args.threads,
           "torch": torch.__version__, "vocab": args.vocab, "runs": runs}  # fmt: skip
    write_json(args.out, out, indent=1)


if __name__ == "__main__":
    main()
