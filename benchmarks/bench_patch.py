"""Patching and clamping cost, side by side in one run.

1. **Feature sweep**: each of `--features` SAE features patched alone (delta-only, last position)
   on every case of the organism FlipBank, with the last-token fast path (`patch_sweep(fast=True)`:
   each prompt runs once up to its last token, the last token once per feature on that cache)
   against full re-forwards of every (case, feature) prompt (`fast=False`). Same rows per forward;
   prints seconds, the ratio, and the largest margin difference.
2. **Clamp overhead**: a random ~100M-parameter Gemma 3 VLM (text 15 × 640, 224-px images) with a
   random JumpReLU SAE (8192 features) on its middle layer, batch `--batch` prompts; the plain
   forward and the `ClampedVLM` forward (one feature clamped at every position) interleaved for
   `--rounds` rounds; prints median ms and the ratio.
3. **Bank patch**: `patch_bank` with its two controls (the matched control features' own patch
   and the same push along the controls' rows) on every case, top-`--bank-features` features by mean |Δf|:
   each paraphrase once up to its last token and the last token once per patch (`fast=True`)
   against a full forward per patch (`fast=False`); prints seconds, the ratio, and the largest
   margin difference. `bench_medgemma.py` makes the same comparison at MedGemma's shapes.
4. **Answer head**: the yes−no margin of `--head-rows` final hidden states at MedGemma's width
   and 262,208-token vocabulary, through the full unembedding then `yes_no_margin` against the
   answer tokens' rows alone (`head_margin`, what the last-token and shared-prefix paths read);
   a rank-1 null scores 257 such rows per flip.
5. **Feature count**: how many of the top-`--count-features` features (by mean |Δf|, at the
   organism's entry SAE) undo the flips, as `flipscope patch --count` runs it (`count_sweep`: each
   paraphrase once up to its last token, then the last token once per count and per count's
   controls) against `patch_bank` once per count with the same controls (a prompt forward per case
   per count, plus its same-push control); prints seconds, the ratio, and the largest difference
   between the two ways' patched margins.
6. **Rank-1 null**: rank-1 patching at the organism's entry (`blocks.0.hook_attn_out`) with its
   random-direction null drawn once at the size it reports (the best of 32 from 32 directions)
   against the expected best of 32 from `--draws` directions (the default); prints seconds, the
   ratio, and both nulls' values.

Both keep small vocabularies on purpose: the sweep's two paths and the clamp's two forwards
unembed the same last positions, so a 262,208-token vocabulary would add the same cost to both
sides and only hide the difference measured here (`bench_eval.py` measures at the real one).

Run: `.venv/bin/python benchmarks/bench_patch.py [--features 50] [--batch 16] [--rounds 9]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import JumpReLUSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

from flipscope.data.atomic import write_json
from flipscope.data.flipbank import load_flipbank
from flipscope.data.store import read_rows
from flipscope.experiments.pairs import collect_pairs
from flipscope.experiments.patching import patch_bank
from flipscope.experiments.rank1 import rank1_patch
from flipscope.experiments.sweeps import count_sweep, patch_sweep
from flipscope.experiments.upstream import framing_word_shifts
from flipscope.interventions.edited import ClampedVLM
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.answers import AnswerTokens, head_margin, yes_no_margin
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm
from flipscope.model.vision_once import ImageMemo
from flipscope.organism import load_organism

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


def feature_sweep(n_features: int) -> dict:
    vlm, sae, card = load_organism()
    bank = load_flipbank(BANK)
    pairs = collect_pairs(vlm, bank, [card["hook_name"]], progress=False)
    features = list(range(n_features))
    timings, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for fast in (True, False):
            vlm.image_memo.clear()  # each path encodes its own films, as it would run alone
            start = time.perf_counter()
            store = patch_sweep(vlm, sae, bank, features, Path(tmp) / f"{fast}.jsonl", fast=fast, pairs=pairs,
                                progress=False)  # fmt: skip
            timings[fast] = time.perf_counter() - start
            rows[fast] = [r["m_patched"] for r in read_rows(store.path)]
    return {
        "cases": len(pairs.cases),
        "features": n_features,
        "fast_s": timings[True],
        "full_s": timings[False],
        "ratio": timings[False] / timings[True],
        "max_margin_diff": max(abs(a - b) for a, b in zip(rows[True], rows[False], strict=True)),
    }


def bank_patch_paths(vlm, sae, bank: dict, n_features: int, batch_size: int) -> dict:
    """`patch_bank` with both controls on the last-token path and on full forwards, same rows."""
    hook = sae.cfg.metadata.hook_name
    pairs = collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=False)
    size = pairs.feature_delta(sae, hook)[torch.from_numpy(pairs.is_flip)].abs().mean(0)
    features = size.topk(n_features).indices.tolist()
    timings, margins = {}, {}
    for fast in (True, False):
        vlm.image_memo.clear()  # each path encodes its own films, as it would run alone
        start = time.perf_counter()
        rows = patch_bank(vlm, sae, bank, features, pairs=pairs, batch_size=batch_size, fast=fast, progress=False).rows
        timings[fast] = time.perf_counter() - start
        margins[fast] = torch.tensor([[r["m_patched"], r["m_control_feature"], r["m_same_push"]] for r in rows])
    return {
        "cases": len(pairs.cases),
        "features": features,
        "batch_size": batch_size,
        "fast_s": timings[True],
        "full_s": timings[False],
        "ratio": timings[False] / timings[True],
        "max_margin_diff": float((margins[True] - margins[False]).abs().max()),
    }


def clamp_overhead(batch: int, rounds: int) -> dict:
    words = "yes no is there a an pleural effusion opacity the lungs clear do you see this film ?".split()
    cfg = TinyVLMConfig(words=words, text_layers=15, d_model=640, d_mlp=2560, n_heads=8, n_kv_heads=4,
                        head_dim=80, image_size=224, seed=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        vlm = HookedVLM.from_pretrained(save_tiny_vlm(cfg, Path(tmp) / "m"))
    layer = vlm.n_layers // 2
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=vlm.d_model, d_sae=8192,
                                        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")))  # fmt: skip
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.02)
    clamped = ClampedVLM(vlm, sae, {7: 0.0})
    inputs = vlm.prompts.build([PromptSpec(question="Is there a pleural effusion?", condition="blank")] * batch)
    plain, hooked = [], []
    with torch.no_grad():
        vlm(inputs), clamped(inputs)  # warm up
        for _ in range(rounds):
            start = time.perf_counter()
            vlm(inputs)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            clamped(inputs)
            hooked.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in vlm.hf_model.parameters())
    return {
        "params_m": n_params / 1e6,
        "batch": batch,
        "tokens": int(inputs.input_ids.shape[1]),
        "plain_ms": 1000 * statistics.median(plain),
        "clamped_ms": 1000 * statistics.median(hooked),
        "ratio": statistics.median(hooked) / statistics.median(plain),
    }


def answer_head(rows: int, rounds: int, d_model: int = 2560, vocab: int = 262_208) -> dict:
    head = torch.nn.Linear(d_model, vocab, bias=False)
    tokens, hidden = AnswerTokens(yes_ids=(4, 9), no_ids=(17, 21)), torch.randn(rows, d_model)
    full, rows_only = [], []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            a = yes_no_margin(head(hidden), tokens)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = head_margin(hidden, head, tokens)
            rows_only.append(time.perf_counter() - start)
    return {
        "rows": rows,
        "d_model": d_model,
        "vocab": vocab,
        "full_ms": 1000 * statistics.median(full),
        "answer_rows_ms": 1000 * statistics.median(rows_only),
        "ratio": statistics.median(full) / statistics.median(rows_only),
        "max_margin_diff": float((a - b).abs().max()),
    }


def organism_bank_patch(n_features: int) -> dict:
    vlm, sae, _ = load_organism()
    return bank_patch_paths(vlm, sae, load_flipbank(BANK), n_features, batch_size=32)


def bank_patch_line(b: dict) -> str:
    return (
        f"bank patch with both controls, {b['cases']} cases: last token {b['fast_s']:.2f} s, "
        f"full forwards {b['full_s']:.2f} s, ratio {b['ratio']:.1f}x, max margin diff {b['max_margin_diff']:.1e}"
    )


def rank1_null(draws: int, hook: str = "blocks.0.hook_attn_out") -> dict:
    vlm, _, _ = load_organism()
    pairs = collect_pairs(vlm, load_flipbank(BANK), [hook], progress=False)
    return rank1_paths(vlm, pairs, hook, draws)


def memo_paths(vlm, sae, bank: dict, n_features: int, batch_size: int, film: PromptSpec) -> dict:
    """`flipscope patch`'s model-running steps in turn (the pairs, the non-flips' wording bound,
    `patch_bank` with both controls), once with each film's tower output kept between them
    (`HookedVLM.image_memo`) and once with a memo that keeps nothing (the tower on each film in
    every step), after one warm-up forward on `film`; the tower's runs, seconds, and the largest
    difference between the two ways' margins (each film is encoded alone either way)."""
    hook = sae.cfg.metadata.hook_name

    def steps() -> torch.Tensor:
        pairs = collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=False)
        features = pairs.feature_delta(sae, hook)[torch.from_numpy(pairs.is_flip)].abs().mean(0).topk(n_features)
        wording = framing_word_shifts(vlm, bank, batch_size=batch_size)
        rows = patch_bank(vlm, sae, bank, features.indices.tolist(), pairs=pairs, batch_size=batch_size,
                          wording=wording, progress=False).rows  # fmt: skip
        patched = [m for r in rows for m in (r["m_patched"], r["m_control_feature"], r["m_same_push"])]
        return torch.cat([pairs.margin_orig, pairs.margin_para, torch.tensor([*wording.values(), *patched])])

    with torch.no_grad():
        vlm.score(vlm.prompts.build([film]))
    kept = vlm.image_memo
    report, margins = {"cases": len(bank["flips"]) + len(bank["controls"]), "features": n_features}, {}
    try:
        for way, memo in (("kept", ImageMemo()), ("none", ImageMemo(max_bytes=0))):
            vlm.image_memo = memo
            start = time.perf_counter()
            margins[way] = steps()
            report[way] = {"seconds": time.perf_counter() - start, "tower_runs": memo.encoded, "served": memo.served}
    finally:
        vlm.image_memo = kept
    report["films"] = len({c["image"] for c in [*bank["flips"], *bank["controls"]]})
    report["ratio"] = report["none"]["seconds"] / report["kept"]["seconds"]
    report["max_abs_diff"] = float((margins["kept"] - margins["none"]).abs().max())
    return report


def count_paths(vlm, sae, bank: dict, n_features: int, batch_size: int) -> dict:
    """The count sweep against one `patch_bank` per count (same features, same controls)."""
    hook = sae.cfg.metadata.hook_name
    pairs = collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=False)
    features = pairs.feature_delta(sae, hook)[torch.from_numpy(pairs.is_flip)].abs().mean(0).topk(n_features)
    features = features.indices.tolist()
    with tempfile.TemporaryDirectory() as tmp:
        vlm.image_memo.clear()
        start = time.perf_counter()
        store = count_sweep(vlm, sae, bank, features, Path(tmp) / "count.jsonl", pairs=pairs, batch_size=batch_size,
                            progress=False)  # fmt: skip
        sweep_s = time.perf_counter() - start
        rows, controls = read_rows(store.path), store.header["controls"]
    swept = {(r["case"], r["variant"]): r["m_patched"] for r in rows}
    vlm.image_memo.clear()
    start, diff = time.perf_counter(), 0.0
    for k in range(1, n_features + 1):
        patched = patch_bank(vlm, sae, bank, features[:k], pairs=pairs, batch_size=batch_size,
                             control_features=controls[k - 1], progress=False).rows  # fmt: skip
        for r in patched:
            diff = max(diff, abs(r["m_patched"] - swept[r["case"], f"features:{k}"]),
                       abs(r["m_control_feature"] - swept[r["case"], f"controls:{k}"]))  # fmt: skip
    separate_s = time.perf_counter() - start
    return {"cases": len(pairs.cases), "features": features, "count_s": sweep_s, "separate_s": separate_s,
            "ratio": separate_s / sweep_s, "max_margin_diff": diff}  # fmt: skip


def organism_count(n_features: int) -> dict:
    from flipscope.organism.entry_sae import load_entry_sae

    vlm, _, _ = load_organism()
    return count_paths(vlm, load_entry_sae(), load_flipbank(BANK), n_features, batch_size=32)


def count_line(n: dict) -> str:
    return (
        f"feature count, {len(n['features'])} counts x {n['cases']} cases: one sweep {n['count_s']:.2f} s, a patch "
        f"per count {n['separate_s']:.2f} s, ratio {n['ratio']:.1f}x, max margin diff {n['max_margin_diff']:.1e}"
    )


def rank1_paths(vlm, pairs, hook: str, draws: int) -> dict:
    """Rank-1 patching at `hook` with its null drawn once at 32 directions and from `draws`."""
    rank1_patch(vlm, pairs, hook, n_random=4, n_draws=4)  # warm up
    timings, nulls = {}, {}
    for n_draws in (32, draws):
        vlm.image_memo.clear()  # each null encodes its own films, as it would run alone
        start = time.perf_counter()
        nulls[n_draws] = rank1_patch(vlm, pairs, hook, n_random=32, n_draws=n_draws)["random"]
        timings[n_draws] = time.perf_counter() - start
    return {
        "flips": int(pairs.is_flip.sum()),
        "draws": draws,
        "one_draw_s": timings[32],
        "expected_s": timings[draws],
        "ratio": timings[draws] / timings[32],
        "best_of_32_one_draw": nulls[32]["best_mean_recovery"],
        "best_of_32_expected": nulls[draws]["best_mean_recovery"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--draws", type=int, default=256)
    parser.add_argument("--bank-features", type=int, default=5)
    parser.add_argument("--head-rows", type=int, default=257)
    parser.add_argument("--count-features", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/patch.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "machine": platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "feature_sweep": feature_sweep(args.features),
        "clamp": clamp_overhead(args.batch, args.rounds),
        "bank_patch": organism_bank_patch(args.bank_features),
        "answer_head": answer_head(args.head_rows, args.rounds),
        "rank1_null": rank1_null(args.draws),
        "feature_count": organism_count(args.count_features),
    }
    s, c, r, b = result["feature_sweep"], result["clamp"], result["rank1_null"], result["bank_patch"]
    print(
        f"feature sweep, {s['features']} features x {s['cases']} cases: fast {s['fast_s']:.2f} s, "
        f"full {s['full_s']:.2f} s, ratio {s['ratio']:.1f}x, max margin diff {s['max_margin_diff']:.1e}"
    )
    print(
        f"clamp, {c['params_m']:.0f}M params, batch {c['batch']} x {c['tokens']} tokens: "
        f"plain {c['plain_ms']:.0f} ms, clamped {c['clamped_ms']:.0f} ms, ratio {c['ratio']:.3f}"
    )
    print(bank_patch_line(b))
    h = result["answer_head"]
    print(
        f"answer head, {h['rows']} rows x {h['d_model']} -> {h['vocab']:,} tokens: full unembedding "
        f"{h['full_ms']:.1f} ms, answer rows {h['answer_rows_ms']:.2f} ms, ratio {h['ratio']:.0f}x, "
        f"max margin diff {h['max_margin_diff']:.1e}"
    )
    print(
        f"rank-1 null, {r['flips']} flips: best of 32 from 32 directions {r['one_draw_s']:.2f} s "
        f"({r['best_of_32_one_draw']:.3f}), expected from {r['draws']} {r['expected_s']:.2f} s "
        f"({r['best_of_32_expected']:.3f}), ratio {r['ratio']:.1f}x"
    )
    print(count_line(result["feature_count"]))
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
