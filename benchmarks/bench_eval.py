"""Evaluation throughput: naive loop vs batched vs shared-prefix reuse, side by side in one run.

Random Gemma 3 VLMs with MedGemma's 262,208-token vocabulary score `--images` films × (original +
`--paraphrases`) prompts three ways, each from the same question set:

- `naive`: one HF forward per prompt through the processor (no batching, no reuse);
- `batched`: `PromptBuilder.build` batches of full prompts (`EvalConfig(fast=False)`'s path);
- `prefix`: `HookedVLM.score_shared_prefix`, the vision tower and shared tokens once per image,
  only each prompt's last token unembedded.

Two models (`CONFIGS`): MedGemma's vision geometry (896-px images, 256 soft tokens), where the
vision tower dominates, and the real Gemma 3 270M's language-model geometry with a 64-px tower,
where the unembedding dominates. Prints prompts/s with ratios to naive and to batched, and the
largest margin difference to naive; writes JSON.
Run: `.venv/bin/python benchmarks/bench_eval.py [--configs ...] [--vocab 262208] [--images 3]`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flipscope.data.atomic import write_json
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.answers import yes_no_margin
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm

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


VOCAB = 262_208  # MedGemma 4B's vocabulary: the unembedding every scored position pays for
CONFIGS = {
    # MedGemma's vision geometry: 896-px images, 14-px patches, 256 soft tokens (a smaller tower and LM)
    "medgemma-vision": dict(
        text_layers=15, d_model=640, d_mlp=2560, n_heads=8, n_kv_heads=4, head_dim=80, sliding_window=512,
        vision_layers=6, vision_d_model=384, image_size=896, patch_size=14, mm_tokens_per_image=256,
    ),
    # the real Gemma 3 270M language model's geometry with a small vision tower: the unembedding dominates
    "gemma-270m-geometry": dict(
        text_layers=18, d_model=640, d_mlp=2048, n_heads=4, n_kv_heads=1, head_dim=256, sliding_window=512,
        vision_layers=2, vision_d_model=64, image_size=64, patch_size=8, mm_tokens_per_image=16,
    ),
}  # fmt: skip


def run_config(name: str, vocab: int, args: argparse.Namespace) -> dict:
    """The three paths on one model, each timed once in one run, with margins compared to naive."""
    config = TinyVLMConfig(words=WORDS, vocab_size=vocab, **CONFIGS[name])
    with tempfile.TemporaryDirectory() as tmp:
        vlm = HookedVLM.from_pretrained(save_tiny_vlm(config, Path(tmp) / "bench-vlm"))
    n_params = sum(p.numel() for p in vlm.hf_model.parameters())
    rng = np.random.default_rng(0)
    size = config.image_size
    films = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(args.images)]
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
        return torch.cat([vlm.score_shared_prefix(group, batch_size=args.batch) for group in groups])

    results = {}
    with torch.inference_mode():
        vlm.score(vlm.prompts.build(specs[:1]))  # warm-up: first-call allocations are no path's cost
        for path, fn in (("naive", naive), ("batched", batched), ("prefix", prefix)):
            start = time.perf_counter()
            margins = fn()
            seconds = time.perf_counter() - start
            results[path] = {"seconds": seconds, "prompts_per_s": len(specs) / seconds, "margins": margins}
    reference = results["naive"]["margins"]
    rows = [
        {
            "path": path,
            "seconds": round(r["seconds"], 2),
            "prompts_per_s": round(r["prompts_per_s"], 3),
            "ratio_to_naive": round(r["prompts_per_s"] / results["naive"]["prompts_per_s"], 2),
            "ratio_to_batched": round(r["prompts_per_s"] / results["batched"]["prompts_per_s"], 2),
            "max_margin_diff": float((r["margins"] - reference).abs().max()),
            "same_answers": bool(torch.equal(r["margins"] > 0, reference > 0)),
        }
        for path, r in results.items()
    ]
    return {"config": name, "params": n_params, "vocab": int(vlm.hf_model.config.text_config.vocab_size),
            "image_size": size, "prompts": len(specs), "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary rows (0: the tiny tokenizer's ~40)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--paraphrases", type=int, default=5)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for name in args.configs:
        run = run_config(name, args.vocab, args)
        runs.append(run)
        print(f"{name}: {run['params'] / 1e6:.0f}M parameters, vocabulary {run['vocab']:,}, "
              f"{run['image_size']}-px images, {run['prompts']} prompts, {args.threads} threads")  # fmt: skip
        print(f"  {'path':<10}{'s':>8}{'prompts/s':>11}{'vs naive':>10}{'vs batched':>12}{'max |Δmargin|':>15}")
        for row in run["rows"]:
            print(
                f"  {row['path']:<10}{row['seconds']:>8.1f}{row['prompts_per_s']:>11.3f}{row['ratio_to_naive']:>10.2f}"
                f"{row['ratio_to_batched']:>12.2f}{row['max_margin_diff']:>15.2e}"
            )
    report = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(), "runs": runs}
    write_json(args.out, report, indent=2)


if __name__ == "__main__":
    main()
