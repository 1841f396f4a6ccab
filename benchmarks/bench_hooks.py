"""Cost of flipscope's hooks beside the plain HF forward, measured side by side in one run.

Builds a Gemma 3 VLM of about 40M parameters (random weights, same classes as MedGemma), then
times, interleaved round by round so drift hits every variant alike:

- `hf`: the plain `Gemma3ForConditionalGeneration` forward (the reference, ratio 1.00);
- `vlm`: `HookedVLM` with no hooks;
- `vlm+hook`: one observing hook on `blocks.{L}.hook_resid_post`;
- `cache(1 layer, last pos)`: `run_with_cache` with a names filter and `positions="last"`;
- `cache(all)`: `run_with_cache` of every hook point;
- `bridge` / `bridge cache(1 layer)`: TransformerLens 3.9's `TransformerBridge` on the same
  checkpoint (it forces eager attention, so it is also compared with HF eager: `hf eager`).

The vocabulary stays the tiny tokenizer's (~40 words) on purpose: every variant pays the same
unembedding, and at Gemma's 262,208 tokens it would dwarf the hooks' own cost, the quantity
measured here (`bench_eval.py` measures at the real vocabulary).

Run: `.venv/bin/python benchmarks/bench_hooks.py [--rounds N] [--out FILE]`. Prints a table of
median milliseconds and ratios, and writes it as JSON beside the configuration.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flipscope.data.atomic import write_json
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm

WORDS = ("yes", "no", "is", "there", "a", "an", "any", "effusion", "opacity", "pleural", "the", "lungs", "clear", "?")
CONFIG = TinyVLMConfig(
    words=WORDS,
    text_layers=8,
    d_model=512,
    d_mlp=2048,
    n_heads=8,
    n_kv_heads=4,
    head_dim=64,
    sliding_window=64,
    vision_layers=4,
    vision_d_model=256,
    image_size=224,
    patch_size=14,
    mm_tokens_per_image=64,
)


def _refuse(*args, **kwargs):
    raise RuntimeError(f"refused subprocess {args}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bridge", action="store_true", help="skip the TransformerBridge rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hooks.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        directory = save_tiny_vlm(CONFIG, Path(tmp) / "bench-vlm")
        vlm = HookedVLM.from_pretrained(directory)
        eager = HookedVLM.from_pretrained(directory, attn_implementation="eager")
        bridge = None
        if not args.no_bridge:
            from transformer_lens.model_bridge import TransformerBridge

            saved = subprocess.check_call
            subprocess.check_call = _refuse  # never let the Bridge pip-install torchvision
            try:
                bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
            finally:
                subprocess.check_call = saved

    rng = np.random.default_rng(0)
    questions = ["Is there an effusion?", "Is there any pleural effusion?", "Are the lungs clear?", "Is there opacity?"]
    specs = [
        PromptSpec(question=questions[i % len(questions)], image=rng.integers(0, 256, (256, 256), dtype=np.uint8))
        for i in range(args.batch)
    ]
    batch = vlm.prompts.build(specs)
    kwargs = batch.as_kwargs()
    layer = vlm.n_layers // 2
    name = f"blocks.{layer}.hook_resid_post"
    n_params = sum(p.numel() for p in vlm.hf_model.parameters())

    variants: dict[str, Callable[[], object]] = {
        "hf": lambda: vlm.hf_model(**kwargs),
        "vlm": lambda: vlm(batch),
        "vlm+hook": lambda: vlm.run_with_hooks(batch, fwd_hooks=[(name, lambda x, hook: None)]),
        "cache(1 layer, last pos)": lambda: vlm.run_with_cache(batch, names_filter=name, positions="last"),
        "cache(all)": lambda: vlm.run_with_cache(batch),
        "hf eager": lambda: eager.hf_model(**kwargs),
    }
    if bridge is not None:
        bridge_kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
        ids = bridge_kwargs.pop("input_ids")
        variants["bridge"] = lambda: bridge(ids, **bridge_kwargs)
        variants["bridge cache(1 layer)"] = lambda: bridge.run_with_cache(
            ids, names_filter=f"blocks.{layer}.hook_out", **bridge_kwargs
        )

    times: dict[str, list[float]] = {key: [] for key in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for key, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)

    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    rows = []
    for key, ms in median.items():
        reference = median["hf eager"] if key.startswith("bridge") else median["hf"]
        rows.append({"variant": key, "median_ms": round(ms, 2), "ratio": round(ms / reference, 3)})
    report = {
        "params": n_params,
        "batch": args.batch,
        "seq_len": int(batch.input_ids.shape[1]),
        "rounds": args.rounds,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "config": {k: v for k, v in CONFIG.__dict__.items() if k != "words"},
        "rows": rows,
        "note": "ratios are against `hf` (sdpa); bridge rows against `hf eager`, the attention the Bridge forces",
    }
    print(f"{n_params / 1e6:.1f}M parameters, batch {args.batch} x {report['seq_len']} tokens, {args.rounds} rounds")
    print(f"{'variant':<28}{'median ms':>10}{'ratio':>8}")
    for row in rows:
        print(f"{row['variant']:<28}{row['median_ms']:>10.1f}{row['ratio']:>8.3f}")
    write_json(args.out, report, indent=2)


if __name__ == "__main__":
    main()
