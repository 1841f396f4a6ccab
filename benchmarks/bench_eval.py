"""Evaluation throughput: naive loop vs batched vs shared-prefix reuse, side by side in one run.

A random Gemma 3 VLM of about 100M parameters with MedGemma's vision geometry (896-px images,
14-px patches, 256 soft tokens per image) scores `--images` films × (original + `--paraphrases`)
prompts three ways, each from the same question set:

- `naive`: one HF forward per prompt through the processor (no batching, no reuse);
- `batched`: `PromptBuilder.build` batches of full prompts (`EvalConfig(fast=False)`'s path);
- `prefix`: `score_shared_prefix`, the vision tower and shared tokens once per image.

Prints prompts/s and the ratio to naive, the largest margin difference to naive, and writes JSON.
Run: `.venv/bin/python benchmarks/bench_eval.py [--image-size 896] [--images 3] [--paraphrases 5]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flipscope import HookedVLM, PromptSpec, yes_no_margin
from flipscope.fastpath import score_shared_prefix
from flipscope.tiny import TinyVLMConfig, save_tiny_vlm

WORDS = (
    "yes no is there a an any pleural effusion opacity the lungs clear do you see this film show present "
    "on radiograph can be seen x ray please assess for it evaluate ? . : -"
).split()
PARAPHRASES = (
    "Is there a pleural effusion?",
    "Do you see a pleural effusion?",
    "Does this film show a pleural effusion?",
    "Is a pleural effusion present on this radiograph?",
    "Can a pleural effusion be seen on this x-ray?",
    "Please assess this film for pleural effusion: is it present?",
    "Evaluate this radiograph for an effusion. Is it present?",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=896)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--paraphrases", type=int, default=5)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TinyVLMConfig(
        words=WORDS,
        text_layers=15,
        d_model=640,
        d_mlp=2560,
        n_heads=8,
        n_kv_heads=4,
        head_dim=80,
        sliding_window=512,
        vision_layers=6,
        vision_d_model=384,
        image_size=args.image_size,
        patch_size=14,
        mm_tokens_per_image=256,
    )
    with tempfile.TemporaryDirectory() as tmp:
        vlm = HookedVLM.from_pretrained(save_tiny_vlm(config, Path(tmp) / "bench-vlm"))
    n_params = sum(p.numel() for p in vlm.hf_model.parameters())
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (args.image_size, args.image_size), dtype=np.uint8) for _ in range(args.images)]
    questions = PARAPHRASES[: args.paraphrases + 1]
    groups = [[PromptSpec(question=q, image=film) for q in questions] for film in films]
    specs = [s for group in groups for s in group]

    def naive() -> torch.Tensor:
        logits = [vlm.hf_model(**vlm.prompts.encode(s)).logits[:, -1] for s in specs]
        return yes_no_margin(torch.cat(logits), vlm.answer_tokens)

    def batched() -> torch.Tensor:
        return torch.cat(
            [vlm.score(vlm.prompts.build(specs[i : i + args.batch])) for i in range(0, len(specs), args.batch)]
        )

    def prefix() -> torch.Tensor:
        return torch.cat([score_shared_prefix(vlm, vlm.prompts, group, args.batch) for group in groups])

    results = {}
    with torch.inference_mode():
        for name, fn in (("naive", naive), ("batched", batched), ("prefix", prefix)):
            start = time.perf_counter()
            margins = fn()
            seconds = time.perf_counter() - start
            results[name] = {"seconds": seconds, "prompts_per_s": len(specs) / seconds, "margins": margins}
    reference = results["naive"]["margins"]
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "path": name,
                "seconds": round(r["seconds"], 2),
                "prompts_per_s": round(r["prompts_per_s"], 3),
                "ratio_to_naive": round(r["prompts_per_s"] / results["naive"]["prompts_per_s"], 2),
                "max_margin_diff": float((r["margins"] - reference).abs().max()),
                "same_answers": bool(torch.equal(r["margins"] > 0, reference > 0)),
            }
        )
    report = {
        "params": n_params,
        "image_size": args.image_size,
        "images": args.images,
        "prompts": len(specs),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    print(
        f"{n_params / 1e6:.0f}M parameters, {args.image_size}-px images, {len(specs)} prompts, {args.threads} threads"
    )
    print(f"{'path':<10}{'s':>8}{'prompts/s':>11}{'ratio':>8}{'max |Δmargin|':>15}")
    for row in rows:
        print(
            f"{row['path']:<10}{row['seconds']:>8.1f}{row['prompts_per_s']:>11.3f}{row['ratio_to_naive']:>8.2f}"
            f"{row['max_margin_diff']:>15.2e}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
