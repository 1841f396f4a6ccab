"""Peak memory of last-token variants at MedGemma 4B's key/value shapes, side by side in one run.

Patching sweeps and the rank-1 null (`score_last_token`) run each prompt once up to its last
token, then the last token once per variant on that key/value cache. Before, every row held its
own copy of the whole cache (HF's `batch_repeat_interleave`): for a 300-token prompt over 34
layers × 4 KV heads × 256 that is ~42 MB a row in bfloat16, ~84 MB in float32. `shared_rows`
copies each layer's keys and values only while that layer attends.

The model: a random `Gemma3ForCausalLM` with MedGemma 4B's attention (34 layers, 8 query and 4 KV
heads of 256, window 1,024, 5:1 local to global) and a narrow residual (640) and MLP (64), so
its weights stay small and the cache is what the runs differ in. `--prompts` prompts of ~300
tokens, `--variants` last-token variants each (an edit per variant at a middle layer). Each path
runs in a fresh process (peak RSS from `wait4`); margins must agree exactly.

Run: `.venv/bin/python benchmarks/bench_kv_rows.py [--prompts 4] [--variants 16]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flipscope.data.atomic import write_json

WORDS = ("yes", "no", *(f"w{i}" for i in range(62)))


def _model(folder: Path) -> Path:
    from flipscope.model.tiny import TinyVLMConfig
    from flipscope.model.tiny_families import save_tiny

    cfg = TinyVLMConfig(words=WORDS, text_layers=34, d_model=640, d_mlp=64, n_heads=8, n_kv_heads=4, head_dim=256,
                        sliding_window=1024, global_every=6, max_positions=4096, seed=0)  # fmt: skip
    return save_tiny("gemma3_text", cfg, folder)


def _child(folder: Path, path: str, prompts: int, variants: int, out: Path) -> None:
    from flipscope.model import HookedVLM, PromptSpec, kv

    vlm = HookedVLM.from_pretrained(folder)
    if path == "copied":

        def copied(cache, repeats: int):
            copied = copy.deepcopy(cache)
            copied.batch_repeat_interleave(repeats)
            return copied

        kv.shared_rows = copied
    rng = torch.Generator().manual_seed(0)
    specs = [PromptSpec(question=" ".join(WORDS[int(i)] for i in torch.randint(64, (290,), generator=rng)),
                        condition="none") for _ in range(prompts)]  # fmt: skip

    def edit(x: torch.Tensor, hook) -> torch.Tensor:
        return x * torch.linspace(0.5, 1.5, len(x), dtype=x.dtype)[:, None, None]

    n_tokens = vlm.prompts.build(specs[:1]).input_ids.shape[1]
    start = time.perf_counter()
    margins = kv.score_last_token(vlm, vlm.prompts, specs, variants, [("blocks.17.hook_resid_post", edit)])
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"seconds": seconds, "margins": margins.tolist(), "tokens": n_tokens}))


def _run(folder: Path, path: str, args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / f"{path}.json"
    command = [sys.executable, __file__, "--child", path, "--model", str(folder),
               "--prompts", str(args.prompts), "--variants", str(args.variants), "--child-out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{path} failed: {process.stderr.read().decode()[-2000:]}")
    return {**json.loads(out.read_text()), "peak_rss_gb": usage.ru_maxrss / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--variants", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_rows.json"))
    parser.add_argument("--child", choices=["copied", "shared"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.child, args.prompts, args.variants, args.child_out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = _model(Path(tmp) / "model")
        runs = {path: _run(folder, path, args, Path(tmp)) for path in ("copied", "shared")}
    rows = args.prompts * args.variants
    kv_row_mb = 34 * 2 * 4 * 256 * runs["shared"]["tokens"] * 4 / 1e6  # float32 keys and values, every layer
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "prompts": args.prompts, "variants": args.variants, "rows": rows, "tokens": runs["shared"]["tokens"],
        "kv_mb_per_row_float32": kv_row_mb,
        **{f"{p}_peak_rss_gb": r["peak_rss_gb"] for p, r in runs.items()},
        **{f"{p}_seconds": r["seconds"] for p, r in runs.items()},
        "peak_ratio": runs["copied"]["peak_rss_gb"] / runs["shared"]["peak_rss_gb"],
        "seconds_ratio": runs["copied"]["seconds"] / runs["shared"]["seconds"],
        "margins_equal": runs["copied"]["margins"] == runs["shared"]["margins"],
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
