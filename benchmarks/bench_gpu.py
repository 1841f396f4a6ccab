"""A full-depth random MedGemma 4B on one device: evaluation throughput against the hardware's peak,
attribution's memory by batch size, and what clamping with a 16k-feature SAE costs.

The model has MedGemma 4B's exact shapes (`flipscope.model.shapes`: 34 layers of width 2,560,
262,208-token vocabulary, SigLIP-So400m at 896 px → 256 soft tokens), random weights created on the
device in `--dtype`. Measured side by side in one run:

- evaluation prompts/s on three paths: `naive` (one HF forward per prompt, HF's default logits),
  `batched` (padded batches of whole prompts) and `prefix` (the shared-prefix path flipscope
  evaluates with: the vision tower and shared tokens once per image, only each prompt's last
  token read, through the answer tokens' unembedding rows);
- achieved TFLOP/s of each path counted on the FLOPs that must be done (each image's tower and
  shared tokens once, each prompt's own tokens and its answer tokens' unembedding rows: the work
  of the prefix path), and its share of the device's dense bf16 peak;
- margins in `--dtype` against float32 on the same weights, on plain batches and the shared prefix;
- attribution's peak memory (forward with the SAE spliced in, backward to every feature) by batch size;
- clamping overhead: the prefix path with one feature of a random 16,384-feature GemmaScope 2 SAE
  clamped at every position, against the plain model;
- from the prefix path's cost per prompt, the hours of the PSF-Med sweep (~280k rows with image,
  blank and swap) on one device and on N.

Results go to `--out` (default `benchmarks/results/gpu.json`). On CPU it runs at any `--depth`
(default 1, written to `gpu-on-cpu.json`; the test suite runs `--device cpu --depth 1`); the figures
that matter come from a GPU.
Run: `.venv/bin/python benchmarks/bench_gpu.py [--device cuda] [--depth 34] [--images 8]`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flipscope.data.atomic import write_json
from flipscope.experiments.attribution import frozen_weights
from flipscope.interventions.edited import ClampedVLM
from flipscope.interventions.hooks import splice_features_hook
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.answers import yes_no_margin
from flipscope.model.shapes import medgemma_4b_config, save_random_gemmascope_sae
from flipscope.model.tiny import TinyVLMConfig, build_tiny_vlm, words_of
from flipscope.sae.load import load_sae

PARAPHRASES = (
    "Is there a pleural effusion?",
    "Do you see a pleural effusion?",
    "Does this film show a pleural effusion?",
    "Is a pleural effusion present on this radiograph?",
    "Can a pleural effusion be seen on this x-ray?",
    "Please assess this film for pleural effusion: is it present?",
    "Evaluate this radiograph for an effusion. Is it present?",
    "Can you confirm the suspected pleural effusion?",
    "Is there possibly a small pleural effusion?",
    "Would you say a pleural effusion is visible here?",
)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
PSF_MED_ROWS = 280_000


class PeakMemory:
    """Peak memory inside a `with` block: CUDA allocated bytes, or this process's RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_gb = device, 0.0

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
            return
        stop, peak = threading.Event(), [0]

        def sample() -> None:
            page = os.sysconf("SC_PAGE_SIZE")
            while not stop.is_set():
                with open("/proc/self/statm") as f:
                    peak[0] = max(peak[0], int(f.read().split()[1]) * page)
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak_gb = peak[0] / 1e9


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, after one warm-up call on a GPU (kernel selection, caches)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def must_flops(cfg: TinyVLMConfig, groups: list[list[int]], shared: list[int], answer_rows: int) -> float:
    """FLOPs that must be done to score every prompt: per image the SigLIP tower, the projector
    and the shared tokens once; per prompt its own tokens and the `answer_rows` unembedding rows
    of the yes/no tokens. `groups` holds each image's prompt lengths in tokens, `shared` each
    image's shared prefix length."""
    d, m = cfg.d_model, cfg.d_mlp
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    linear = 2 * (d * q + 2 * d * kv + q * d + 3 * d * m)  # per token per layer

    def lm(start: int, stop: int) -> float:  # tokens at positions start..stop-1, every layer
        positions = np.arange(start, stop) + 1
        window = np.minimum(positions, cfg.sliding_window)
        n_global = sum(1 for i in range(cfg.text_layers) if _is_global(cfg, i))
        attention = 4 * q * (n_global * positions.sum() + (cfg.text_layers - n_global) * window.sum())
        return linear * cfg.text_layers * (stop - start) + float(attention)

    w, wm, patches = cfg.vision_d_model, cfg.vision_d_mlp, (cfg.image_size // cfg.patch_size) ** 2
    vision = cfg.vision_layers * (2 * patches * (4 * w * w + 2 * w * wm) + 4 * patches * patches * w)
    vision += 2 * patches * 3 * cfg.patch_size**2 * w + 2 * cfg.mm_tokens_per_image * w * d
    total = 0.0
    for lengths, prefix in zip(groups, shared, strict=True):
        total += vision + lm(0, prefix) + sum(lm(prefix, n) for n in lengths) + 2 * d * answer_rows * len(lengths)
    return total


def _is_global(cfg: TinyVLMConfig, layer: int) -> bool:
    every = cfg.global_every or cfg.text_layers
    return (layer + 1) % every == 0 or layer == cfg.text_layers - 1


def token_counts(vlm: HookedVLM, groups: list[list[PromptSpec]]) -> tuple[list[list[int]], list[int]]:
    """Each image's prompt lengths and its shared prefix length (longest common token prefix)."""
    lengths, shared = [], []
    for group in groups:
        ids = [vlm.prompts.encode(spec)["input_ids"][0].tolist() for spec in group]
        lengths.append([len(x) for x in ids])
        common = 0
        while all(len(x) > common and x[common] == ids[0][common] for x in ids):
            common += 1
        shared.append(common)
    return lengths, shared


def throughput(vlm: HookedVLM, cfg: TinyVLMConfig, groups: list[list[PromptSpec]], args) -> dict:
    """The three evaluation paths timed side by side, with achieved TFLOP/s on the work that must be done."""
    device = vlm.device
    specs = [s for g in groups for s in g]

    def naive() -> None:
        for spec in specs:
            inputs = {k: v.to(device) for k, v in vlm.prompts.encode(spec).items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
            vlm.hf_model(**inputs)

    def batched() -> None:
        for i in range(0, len(specs), args.batch_size):
            vlm.score(vlm.prompts.build(specs[i : i + args.batch_size]))

    def prefix() -> None:
        for group in groups:
            vlm.score_shared_prefix(group, batch_size=args.batch_size)

    answer_rows = len(vlm.answer_tokens.yes_ids) + len(vlm.answer_tokens.no_ids)
    flops = must_flops(cfg, *token_counts(vlm, groups), answer_rows)
    peak = args.peak_tflops or next((p for k, p in PEAK_BF16_TFLOPS.items() if k in device_name(device)), None)
    paths = {}
    with torch.no_grad():
        for name, fn in (("naive", naive), ("batched", batched), ("prefix", prefix)):
            seconds = timed(fn, device)
            tflops = flops / seconds / 1e12
            paths[name] = {
                "seconds": round(seconds, 4),
                "prompts_per_s": round(len(specs) / seconds, 3),
                "achieved_tflops": round(tflops, 3),
                "share_of_bf16_peak": round(tflops / peak, 4) if peak else None,
            }
            print(f"  {name:>8}: {len(specs) / seconds:9.2f} prompts/s  {tflops:8.2f} TFLOP/s", flush=True)
    for name in ("batched", "prefix"):
        paths[name]["speedup_vs_naive"] = round(paths["naive"]["seconds"] / paths[name]["seconds"], 2)
    return {"n_prompts": len(specs), "must_tflop": round(flops / 1e12, 3), "peak_bf16_tflops": peak, "paths": paths}


def attribution_memory(vlm: HookedVLM, sae, specs: list[PromptSpec], sizes: list[int]) -> list[dict]:
    """Peak memory of attribution's forward + backward (SAE spliced in at its hook) by batch size."""
    hook = sae.cfg.metadata.hook_name
    rows = []
    for size in sizes:
        batch = [specs[i % len(specs)] for i in range(size)]
        meter = PeakMemory(vlm.device)
        start = time.perf_counter()
        with meter.measure():
            grabbed: dict = {}
            inputs = vlm.prompts.build(batch)
            with (
                frozen_weights(vlm),  # as attribution_scores runs it
                torch.enable_grad(),
                vlm.hooks(fwd_hooks=[(hook, splice_features_hook(sae, grabbed))]),
            ):
                margin = yes_no_margin(vlm.last_logits(inputs), vlm.answer_tokens)
                torch.autograd.grad(margin.sum(), grabbed["features"])
        seconds = time.perf_counter() - start
        rows.append({"batch_size": size, "peak_gb": round(meter.peak_gb, 3), "seconds": round(seconds, 3)})
        print(f"  attribution batch {size:>3}: peak {meter.peak_gb:7.2f} GB  {seconds:6.2f} s", flush=True)
    return rows


def clamp_overhead(vlm: HookedVLM, sae, groups: list[list[PromptSpec]], batch_size: int) -> dict:
    clamped = ClampedVLM(vlm, sae, {0: 0.0})

    def run(model: HookedVLM) -> Callable[[], None]:
        return lambda: [model.score_shared_prefix(g, batch_size=batch_size) for g in groups]

    with torch.no_grad():
        plain, edited = timed(run(vlm), vlm.device), timed(run(clamped), vlm.device)
    print(f"  clamp overhead (16k SAE at every position): {edited / plain:.3f}x", flush=True)
    return {"plain_seconds": round(plain, 4), "clamped_seconds": round(edited, 4), "ratio": round(edited / plain, 3)}


def precision(vlm: HookedVLM, group: list[PromptSpec], dtype: torch.dtype) -> dict:
    """Margins of one film's prompts in float32 and after casting the same weights to `dtype`
    (the model is left in `dtype`), on plain batches and on the shared prefix."""

    def margins() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            batched = vlm.score(vlm.prompts.build(group)).double().cpu()
            return batched, vlm.score_shared_prefix(group).double().cpu()

    f32_batched, f32_prefix = margins()
    vlm.hf_model.to(dtype)
    low_batched, low_prefix = margins()
    name = str(dtype).removeprefix("torch.")
    return {
        "n_prompts": len(group),
        "margin_sd_float32": float(f32_batched.std()),
        f"max_abs_{name}_vs_float32": float((low_batched - f32_batched).abs().max()),
        f"sign_agreement_{name}_vs_float32": float((low_batched.sign() == f32_batched.sign()).double().mean()),
        "max_abs_prefix_vs_batched_float32": float((f32_prefix - f32_batched).abs().max()),
        f"max_abs_prefix_vs_batched_{name}": float((low_prefix - low_batched).abs().max()),
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=None, help="decoder layers (default: 34 on a GPU, 1 on cpu)")
    parser.add_argument("--vision-depth", type=int, default=None, help="SigLIP layers (default: 27 x depth / 34)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) or float32 (default on cpu)")
    parser.add_argument("--images", type=int, default=None, help="films (default: 8 on cuda, 1 on cpu)")
    parser.add_argument("--prompts", type=int, default=None, help="wordings per film (default: 10 on cuda, 2 on cpu)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attribution-batches", default=None, help="e.g. 1,8,32 (default on cpu: 1,2)")
    parser.add_argument("--sae-width", type=int, default=16_384)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--precision", action="store_true", help="compare with float32 (default on a GPU)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/gpu.json (cpu: gpu-on-cpu.json)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.depth = args.depth or (1 if cpu else 34)
    args.out = args.out or Path("benchmarks/results") / ("gpu-on-cpu.json" if cpu else "gpu.json")
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    n_images, n_prompts = args.images or (1 if cpu else 8), args.prompts or (2 if cpu else 10)
    sizes = [int(x) for x in (args.attribution_batches or ("1,2" if cpu else "1,8,32")).split(",")]

    torch.manual_seed(0)
    cfg = medgemma_4b_config(words_of([*PARAPHRASES, "yes no"]), depth=args.depth, vision_depth=args.vision_depth)
    start = time.perf_counter()
    check = args.precision or (not cpu and dtype != torch.float32)  # bf16 matmuls crawl on most CPUs
    model, processor = build_tiny_vlm(cfg, dtype=torch.float32 if check else dtype, device=device)
    vlm = HookedVLM(model.eval(), processor)
    print(f"{device_name(device)}: random MedGemma 4B shapes, depth {cfg.text_layers}/{cfg.vision_layers}, {dtype}")
    build_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (cfg.image_size, cfg.image_size), dtype=np.uint8) for _ in range(n_images)]
    questions = [PARAPHRASES[i % len(PARAPHRASES)] for i in range(n_prompts)]
    groups = [[PromptSpec(question=q, image=film) for q in questions] for film in films]
    checked = precision(vlm, groups[0], dtype) if check else None  # leaves the model in `dtype`
    report = {
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "depth": cfg.text_layers,
        "vision_depth": cfg.vision_layers,
        "n_params": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 1),
        "precision": checked,
        "evaluation": throughput(vlm, cfg, groups, args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_gemmascope_sae(tmp, d_in=cfg.d_model, layer=cfg.text_layers // 2, d_sae=args.sae_width)
        sae = load_sae(str(folder), device=str(device)).to(dtype)
    report["attribution_memory"] = attribution_memory(vlm, sae, groups[0], sizes)
    report["clamp_overhead"] = clamp_overhead(vlm, sae, groups, args.batch_size)
    per_prompt = report["evaluation"]["paths"]["prefix"]["seconds"] / report["evaluation"]["n_prompts"]
    hours = PSF_MED_ROWS * per_prompt / 3600
    report["psf_med_sweep_hours"] = {
        "rows": PSF_MED_ROWS,
        "one_device": round(hours, 3),
        "per_device_of_n": "one_device / N",
    }
    print(f"PSF-Med sweep ({PSF_MED_ROWS} rows): {hours:.2f} h on one device, {hours / 8:.2f} h on 8")
    write_json(args.out, report, indent=2)
    if not math.isfinite(hours):
        raise SystemExit("non-finite timing")


if __name__ == "__main__":
    main()
