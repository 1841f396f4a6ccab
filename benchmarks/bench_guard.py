"""What the guard's single-pass gate costs over plain scoring, side by side in one run.

A random Gemma 3 VLM with MedGemma's 262,208-token vocabulary and the real Gemma 3 270M's
language-model geometry (the shape where the last position's work dominates) answers the same
prompts four ways, each repeated and interleaved so drift hits all alike:

- `plain`: `vlm.score(vlm.prompts.build(batch))`, the evaluation's batched path;
- `gate`: `GuardedVLM(vlm, GuardConfig(abs_margin=t)).answer(specs)` (the |margin| gate: no extra pass);
- `gate+probe`: the same with a hidden-state probe read at the answer position during that pass;
- `gate+image`: with the blank-image check (a second pass, for scale).

Prints each path's median seconds and its ratio to `plain`; writes JSON. `guard_run_paths` (run
by `bench_medgemma.py`'s guard stage at MedGemma's 896-px tower) times `flipscope guard answer`'s
run (each film through the tower once, the wordings on their film's cached prefix) against the
tower once with whole prompts and against `GuardedVLM.answer` alone.
Run: `.venv/bin/python benchmarks/bench_guard.py [--vocab 262208] [--prompts 24] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dashboard import layer_tokens  # noqa: E402
from bench_eval import CONFIGS, PARAPHRASES, VOCAB, WORDS  # noqa: E402

from flipscope.data.atomic import write_json
from flipscope.data.questions import Question  # noqa: E402
from flipscope.data.store import iter_rows  # noqa: E402
from flipscope.experiments.guard_run import guard_run, guarded_rows  # noqa: E402
from flipscope.interventions.guarded import GuardConfig, GuardedVLM, reference_films  # noqa: E402
from flipscope.model import HookedVLM, PromptSpec  # noqa: E402
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm  # noqa: E402


def guard_run_paths(
    vlm: HookedVLM, questions: Sequence[Question], n_questions: int = 2, batch_size: int = 8, rounds: int = 2
) -> dict[str, Any]:
    """`flipscope guard answer`'s run three ways on the same questions' wordings and their
    opposite-film checks: `suffix` (`guard_run` as the command runs it: each film through the vision
    tower once, each batch's header and film once per film and the wordings on its cache), `memo`
    (`guard_run(fast=False)`: the tower once a film, every prompt whole) and `plain`
    (`GuardedVLM.answer` alone: the tower and the whole prompt for each). Seconds (the fastest of
    `rounds`, the ways alternating, each from an empty memo), tower images and decoder tokens per
    way, the ratios to `suffix`, the largest margin difference from `plain` and whether every flag
    agrees with it. The |margin| gate at 0.5 and the opposite-film check, with the questions' own
    films as the references."""
    chosen = list(questions[:n_questions])
    guard = GuardedVLM(vlm, GuardConfig(abs_margin=0.5, image_check="opposite"), reference_films(questions))
    found: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, list[float]] = {"suffix": [], "memo": [], "plain": []}
    row: dict[str, Any] = {"questions": len(chosen), "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for path in seconds:
                vlm.image_memo.clear()
                handles, counts, towers = layer_tokens(vlm)
                start = time.perf_counter()
                if path == "plain":
                    found[path] = guarded_rows(guard, chosen, batch_size, fast=False)
                else:
                    store = guard_run(guard, chosen, Path(tmp) / f"{path}-{r}.jsonl", {}, batch_size=batch_size,
                                      fast=path == "suffix", progress=False)  # fmt: skip
                    found[path] = list(iter_rows(store))
                seconds[path].append(time.perf_counter() - start)
                for handle in handles:
                    handle.remove()
                row[f"{path}_tower_images"], row[f"{path}_decoder_tokens"] = sum(towers), counts[0]
    for path, times in seconds.items():
        row[f"{path}_s"], row[f"{path}_s_rounds"] = min(times), times
    row["answers"] = len(found["suffix"])
    row["ratio_plain"], row["ratio_memo"] = row["plain_s"] / row["suffix_s"], row["memo_s"] / row["suffix_s"]
    flags = ("answer", "flip_prone", "image_unreliant", "abstain")
    for path in ("suffix", "memo"):
        pairs = list(zip(found[path], found["plain"], strict=True))
        row[f"{path}_max_margin_diff"] = max(abs(a["margin"] - b["margin"]) for a, b in pairs)
        row[f"{path}_flags_equal"] = all(a[k] == b[k] for a, b in pairs for k in flags)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TinyVLMConfig(words=WORDS, vocab_size=args.vocab, **CONFIGS["gemma-270m-geometry"])
    with tempfile.TemporaryDirectory() as tmp:
        vlm = HookedVLM.from_pretrained(save_tiny_vlm(config, Path(tmp) / "bench-vlm"))
    rng = np.random.default_rng(0)
    films = [rng.integers(0, 256, (config.image_size,) * 2, dtype=np.uint8) for _ in range(args.prompts)]
    specs = [PromptSpec(question=PARAPHRASES[i % len(PARAPHRASES)], image=film) for i, film in enumerate(films)]
    d = vlm.d_model
    probe = {"w": rng.normal(size=d).tolist(), "b": 0.0, "mean": [0.0] * d, "std": [1.0] * d,
             "hook": f"blocks.{vlm.n_layers - 1}.hook_resid_post"}  # fmt: skip
    guards = {
        "gate": GuardedVLM(vlm, GuardConfig(abs_margin=0.5)),
        "gate+probe": GuardedVLM(vlm, GuardConfig(abs_margin=0.5, probe=probe, probe_threshold=0.5)),
        "gate+image": GuardedVLM(vlm, GuardConfig(abs_margin=0.5, image_check="blank", blank_delta=0.5)),
    }

    def plain() -> np.ndarray:
        chunks = [vlm.score(vlm.prompts.build(specs[i : i + args.batch])) for i in range(0, len(specs), args.batch)]
        return torch.cat(chunks).numpy()

    def guarded(guard: GuardedVLM) -> np.ndarray:
        return np.array([a.margin for a in guard.answer(specs, batch_size=args.batch)])

    paths = {"plain": plain} | {name: (lambda g=g: guarded(g)) for name, g in guards.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    margins = {}
    with torch.inference_mode():
        plain()  # warm-up
        for _ in range(args.repeats):
            for name, fn in paths.items():
                start = time.perf_counter()
                margins[name] = fn()
                times[name].append(time.perf_counter() - start)
    base = float(np.median(times["plain"]))
    rows = []
    for name, t in times.items():
        median = float(np.median(t))
        diff = float(np.abs(margins[name] - margins["plain"]).max())
        rows.append({"path": name, "median_s": round(median, 3), "ratio_to_plain": round(median / base, 3),
                     "max_margin_diff": diff})  # fmt: skip
    print(f"vocabulary {args.vocab:,}, {args.prompts} prompts, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")  # fmt: skip
    for row in rows:
        print(f"  {row['path']:<12}{row['median_s']:>8.3f} s{row['ratio_to_plain']:>8.3f}× plain   "
              f"max |Δmargin| {row['max_margin_diff']:.1e}")  # fmt: skip
    report = {"vocab": args.vocab, "prompts": args.prompts, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.machine(), "rows": rows}  # fmt: skip
    write_json(args.out, report, indent=2)


if __name__ == "__main__":
    main()
