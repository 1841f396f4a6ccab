"""Per model family: the hooked forward beside the plain HF forward, and the fast path beside the
naive per-prompt batch, measured side by side in one run.

For each family (`gemma3`, `gemma3_text`, `llava`, `qwen2_5_vl`, and `generic` on the LLaVA
checkpoint) a random checkpoint of the same width is written (8 layers, d_model 512, MLP 2,048,
8 heads / 4 KV heads, a 32,000-token vocabulary; vision towers of 2 layers × 256 at 224 px), then,
interleaved round by round so drift hits every variant alike:

- `hf`: the plain HF forward on the same batch (the reference, ratio 1.00);
- `hooked`: `HookedVLM` with no hooks; `hooked+hook`: one observing hook on a middle layer's
  `hook_resid_post`;
- `naive` / `fast` (families whose fast path is on): 16 paraphrases of one question on one
  film, scored as one left-padded batch of full prompts or on one shared prefix.

Each ratio is the median over rounds of the two variants' times in the same round (paired, so a
slow stretch of the machine slows both; the order of the variants rotates each round).

Run: `.venv/bin/python benchmarks/bench_families.py [--rounds N] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flipscope.data.atomic import write_json
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm
from flipscope.model.tiny_families import save_tiny

WORDS = (
    "yes", "no", "is", "there", "a", "an", "any", "effusion", "opacity", "pleural", "the", "lungs", "clear",
    "do", "you", "see", "in", "this", "film", "report", "shows", "?", ".",
)  # fmt: skip
CONFIG = TinyVLMConfig(
    words=WORDS,
    text_layers=8,
    d_model=512,
    d_mlp=2048,
    n_heads=8,
    n_kv_heads=4,
    head_dim=64,
    sliding_window=64,
    vision_layers=2,
    vision_d_model=256,
    vision_heads=4,
    image_size=224,
    patch_size=14,
    mm_tokens_per_image=64,
    vocab_size=32_000,
)
QUESTIONS = ["is there an effusion ?", "do you see any pleural effusion in this film ?", "are the lungs clear ?"]
PARAPHRASES = [
    " ".join(words)
    for words in (
        ("is", "there", "an", "effusion", "?"),
        ("do", "you", "see", "an", "effusion", "?"),
        ("is", "there", "any", "pleural", "effusion", "in", "this", "film", "?"),
        ("do", "you", "see", "any", "effusion", "in", "the", "lungs", "?"),
    )
] * 4


def _checkpoint(family: str, root: Path) -> Path:
    if family == "gemma3":
        return save_tiny_vlm(CONFIG, root / family)
    return save_tiny("llava" if family == "generic" else family, CONFIG, root / family)


def _specs(vlm: HookedVLM, film: Image.Image) -> list[PromptSpec]:
    if vlm.family.evidence == "text":
        return [
            PromptSpec(question=q, condition=c, context="the report shows a pleural effusion .")
            if c == "context"
            else PromptSpec(question=q, condition="none")
            for q in QUESTIONS
            for c in ("context", "none")
        ]
    return [
        PromptSpec(question=q, condition=c, image=film if c == "image" else None)
        for q in QUESTIONS
        for c in ("image", "none")
    ]


def _para(vlm: HookedVLM, film: Image.Image) -> list[PromptSpec]:
    if vlm.family.evidence == "text":
        return [
            PromptSpec(question=q, condition="context", context="the report shows an effusion .") for q in PARAPHRASES
        ]
    return [PromptSpec(question=q, condition="image", image=film) for q in PARAPHRASES]


def _variants(vlm: HookedVLM, film: Image.Image) -> dict[str, Callable[[], object]]:
    batch = vlm.prompts.build(_specs(vlm, film))
    plain = vlm.family.forward_kwargs(vlm.hf_model, batch.as_kwargs())
    if vlm.family.name == "qwen2_5_vl":  # HF computes its own 3-D positions from the token types
        plain.pop("position_ids")
    layer = f"blocks.{vlm.n_layers // 2}.hook_resid_post"
    seen: list[torch.Tensor] = []
    variants: dict[str, Callable[[], object]] = {
        "hf": lambda: vlm.hf_model(**plain, use_cache=False).logits,
        "hooked": lambda: vlm(batch),
        "hooked+hook": lambda: vlm.run_with_hooks(batch, fwd_hooks=[(layer, lambda x, hook: seen.append(x) or x)]),
    }
    if vlm.fast_path_off is None:
        para = _para(vlm, film)
        variants["naive"] = lambda: vlm.score(vlm.prompts.build(para))
        variants["fast"] = lambda: vlm.score_shared_prefix(para)
    return variants


def _time(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each variant in each round; the order rotates every round so no variant
    always runs first (or right after the most expensive one)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def _ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of `name`'s time over `reference`'s in the same round (paired, so a
    slow stretch of the machine slows both)."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default="gemma3,gemma3_text,llava,qwen2_5_vl,generic")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/families.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    film = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(256, 240), dtype=np.uint8))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            path = _checkpoint(family, Path(tmp))
            vlm = HookedVLM.from_pretrained(path, family="generic" if family == "generic" else None)
            times = _time(_variants(vlm, film), args.rounds)
            ms = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "class": type(vlm.hf_model).__name__,
                "n_params": sum(p.numel() for p in vlm.hf_model.parameters()),
                "ms_median": {k: round(v, 2) for k, v in ms.items()},
                "hooked_vs_hf": round(_ratio(times, "hooked", "hf"), 3),
                "hooked_hook_vs_hf": round(_ratio(times, "hooked+hook", "hf"), 3),
                "fast_vs_naive": round(_ratio(times, "fast", "naive"), 3) if "fast" in times else None,
                "fast_path_off": vlm.fast_path_off,
            }
            results[family] = row
            fast = f"{row['fast_vs_naive']:.2f}" if row["fast_vs_naive"] is not None else "off"
            print(
                f"{family:12s} {row['n_params'] / 1e6:6.1f}M  hf {ms['hf']:7.1f} ms  "
                f"hooked {row['hooked_vs_hf']:.3f}x  "
                f"+hook {row['hooked_hook_vs_hf']:.3f}x  fast/naive {fast}"
            )
    record = {
        "config": {k: v for k, v in CONFIG.__dict__.items() if k != "words"},
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "families": results,
    }
    write_json(args.out, record, indent=2)


if __name__ == "__main__":
    main()
