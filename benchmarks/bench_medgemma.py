"""Every stage at MedGemma 4B's real shapes on CPU: peak memory and time per stage.

A random model with MedGemma 4B's exact widths, heads, rotary and window settings, 262,208-token
vocabulary and 896-px SigLIP-So400m tower (`flipscope.model.shapes`) at reduced depth, with its
answer readout put at the decision boundary so paraphrases flip it, and a random GemmaScope 2 SAE of
16,384 features at its middle layer. The organism's questions and films (resized to 896 px by the
processor) go through the commands a user runs, each a fresh process whose peak RSS and wall time
are measured: evaluate (image, blank) → curate → discover (attribution and exact ablation) →
discovery-paths → patch (with a --sweep) → bank-patch → count → memo → rank1 → trace → heads →
stream → dashboard → guard → clamp. The discovery-paths, bank-patch, count, memo, rank1, trace,
heads, stream, dashboard and guard stages run in this process: discover's three model-running steps on their
suffix and last-token paths against whole prompts (`discovery_paths`), `patch_bank` with both
controls on the last-token path against full forwards (`bench_patch.bank_patch_paths`), `flipscope
patch --count`'s one sweep against a `patch_bank` per count (`bench_patch.count_paths`), `flipscope
patch`'s steps with each film's tower output kept between them against the tower on every film in
every step (`bench_patch.memo_paths`), rank-1 patching at the SAE's hook with its random null drawn
once at 32 directions against the expected best of 32 from 256 (`bench_patch.rank1_paths`), and the
causal trace on the questions alone, each batch's prompts before them run once, against whole
prompts with each film encoded once and with the tower in every forward (`trace_paths`), the trace
head by head the same two first ways (`head_paths`), caching activations alone in forwards that
end at their hook against whole forwards (`stream_paths`), and the feature dashboard with each
film's prompt part before the questions run once against whole prompts, at the SAE's hook and at
layer 0's attention (`bench_dashboard.dashboard_paths`), and `flipscope guard answer`'s run (each
film through the tower once, the wordings on their film's cached prefix) against the tower once with
whole prompts and against `GuardedVLM.answer` alone (`bench_guard.guard_run_paths`).
Then, also in this process, one film's margins on the shared-prefix path against whole prompts
(and, with `--bf16` on a CPU with native bf16 matmuls, bfloat16 against float32; `bench_gpu.py`
makes that comparison on a GPU).
Run: `.venv/bin/python benchmarks/bench_medgemma.py [--depth 2] [--films 3] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_dashboard import dashboard_paths, effects_paths
from bench_guard import guard_run_paths
from bench_patch import bank_patch_line, bank_patch_paths, count_line, count_paths, memo_paths, rank1_paths

from flipscope.data.atomic import write_json
from flipscope.data.flipbank import load_flipbank
from flipscope.data.questions import load_questions
from flipscope.experiments.attribution import attribution_scores, exact_ablation_effects
from flipscope.experiments.heads import trace_heads
from flipscope.experiments.pairs import case_spec, collect_pairs
from flipscope.experiments.upstream import trace_framing
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.images import load_image
from flipscope.model.shapes import centre_answer_readout, medgemma_4b_config, save_random_gemmascope_sae
from flipscope.model.tiny import build_tiny_vlm, words_of
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions
from flipscope.sae.load import check_sae, load_sae

STAGES = (
    "evaluate", "curate", "discover", "discovery-paths", "patch", "bank-patch", "count", "memo", "rank1", "trace",
    "heads", "stream", "dashboard", "guard", "clamp",
)  # fmt: skip


def _high_water_gb(pid: int) -> float | None:
    """The process's own peak RSS so far (VmHWM: counted from its exec, unlike `ru_maxrss`,
    which a child spawned from this large process would inherit)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Peak resident memory (GB) and wall time (s) of one process running `command`."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, _high_water_gb(process.pid) or 0.0)
            time.sleep(0.02)
        if process.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{err.read()[-3000:]}")
    return peak, time.perf_counter() - start


def build(folder: Path, questions: Path, depth: int) -> tuple[Path, Path]:
    """The MedGemma-shaped model (answer readout centred on the organism's prompts) and its SAE."""
    loaded = load_questions(questions)
    words = words_of([p for q in loaded for p in q.prompts] + ["yes no"])
    model, processor = build_tiny_vlm(medgemma_4b_config(words, depth=depth))
    vlm = HookedVLM(model, processor)
    film = load_image(loaded[0].image)
    specs = [PromptSpec(question=p, image=film) for q in loaded[:2] for p in q.prompts]  # one film's 20 wordings
    hidden: list[torch.Tensor] = []  # the final-norm states the answer readout reads, one per prompt
    margin = vlm.answer_margin
    vlm.answer_margin = lambda h: (hidden.append(h.detach()), margin(h))[1]  # type: ignore[method-assign]
    with torch.no_grad():
        vlm.score_shared_prefix(specs)  # the 896-px tower once
    del vlm.answer_margin
    tokens = vlm.answer_tokens
    centre_answer_readout(model, tokens.yes_ids, tokens.no_ids, torch.cat(hidden))
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    sae = save_random_gemmascope_sae(folder / "sae", d_in=model.config.text_config.hidden_size, layer=depth // 2)
    return folder / "model", sae


def stage_commands(model: Path, sae: Path, questions: Path, work: Path, features: list[int]) -> dict[str, list[str]]:
    bank = work / "bank" / "flipbank.json"
    common = ["--model", str(model), "--sae", str(sae)]
    top = ",".join(str(f) for f in features[:3])
    first = top.split(",")[0]
    small = ["--exact-top", "5", "--batch-size", "8"]  # 8 prompts at 896 px per forward
    return {
        "evaluate": ["evaluate", "--model", str(model), "--questions", str(questions), "--out", str(work / "eval")],
        "curate": ["curate", "--results", str(work / "eval"), "--questions", str(questions), "--out", str(bank)],
        "discover": ["discover", "--flipbank", str(bank), *common, *small, "--out", str(work / "f.json")],
        "patch": ["patch", "--flipbank", str(bank), *common, "--features", top, "--sweep", top, *small[2:],
                  "--out", str(work)],
        "clamp": ["clamp", "--questions", str(questions), *common, "--features", first, "--out", str(work / "c")],
    }  # fmt: skip


def shape_summary(config: dict) -> dict:
    """The text and vision tower sizes of a Gemma 3 VLM config (as `config.json` holds it)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "image_size", "patch_size")
    return {part: {k: v for k, v in config[f"{part}_config"].items() if k in keys} for part in ("text", "vision")}


def medgemma_bank_patch(model: Path, sae: Path, bank: Path) -> dict:
    """`patch_bank` with both controls at these shapes, last-token path against full forwards
    (8 prompts per forward, as the CLI stages run)."""
    vlm = HookedVLM.from_pretrained(model)
    return bank_patch_paths(vlm, load_sae(sae), load_flipbank(bank), n_features=3, batch_size=8)


def medgemma_count(model: Path, sae: Path, bank: Path) -> dict:
    """`flipscope patch --count` over 5 features as one sweep against a `patch_bank` per count
    (`bench_patch.count_paths`), 8 prompts per forward."""
    return count_paths(HookedVLM.from_pretrained(model), load_sae(sae), load_flipbank(bank), n_features=5, batch_size=8)


def medgemma_memo(model: Path, sae: Path, bank: Path) -> dict:
    """`flipscope patch`'s steps with the films' tower outputs kept between them and without
    (`bench_patch.memo_paths`)."""
    flipbank = load_flipbank(bank)
    film = case_spec(flipbank.flips[0], flipbank.flips[0]["original"])
    return memo_paths(HookedVLM.from_pretrained(model), load_sae(sae), flipbank, n_features=3, batch_size=8, film=film)


def medgemma_rank1(model: Path, layer: int, bank: Path) -> dict:
    """Rank-1 patching at the SAE's layer: its null from 32 directions and from 256 (257 last-token
    rows a flip, each read through the answer tokens' unembedding rows)."""
    vlm, hook = HookedVLM.from_pretrained(model), f"blocks.{layer}.hook_resid_post"
    pairs = collect_pairs(vlm, load_flipbank(bank), [hook], batch_size=8, progress=False)
    return rank1_paths(vlm, pairs, hook, draws=256)


def medgemma_dashboard(model: Path, sae_path: Path, bank: Path, n_features: int = 8) -> dict:
    """`feature_dashboard` over the whole bank both ways (`bench_dashboard.dashboard_paths`), with
    the SAE at its own hook and the same SAE read at layer 0's attention output (the entry site's
    shape: width 2,560 either way; thresholds at 0, so about half its features fire), 8 prompts per
    forward; and the effects panel both ways (`bench_dashboard.effects_paths`) at both sites."""
    vlm, flipbank = HookedVLM.from_pretrained(model), load_flipbank(bank)
    sae = load_sae(sae_path)
    entry = copy.deepcopy(sae)
    entry.cfg.metadata.hook_name = "blocks.0.hook_attn_out"
    with torch.no_grad():  # thresholds set for unit-variance input would silence every feature on this smaller one
        entry.threshold.zero_()
    features = list(range(n_features))
    out = {check_sae(s, vlm): dashboard_paths(vlm, s, flipbank, features) for s in (sae, entry)}
    for s in (sae, entry):  # the effects panel: 2 features, 4 random directions, 4 prompts (20 writes a prompt)
        out[check_sae(s, vlm)]["effects"] = effects_paths(vlm, s, flipbank, features[:2], prompts=4, n_random=4)
    return out


def counters(vlm: HookedVLM) -> tuple[list[int], list[int]]:
    """Lists that every vision-tower forward (its images) and language-model forward (its tokens)
    of `vlm` appends to, from now on."""
    towers: list[int] = []
    vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: towers.append(o[0].shape[0]))
    tokens: list[int] = []
    vlm.hf_model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: tokens.append(k["inputs_embeds"].shape[:2].numel()), with_kwargs=True
    )
    return towers, tokens


def trace_paths(model: Path, bank: Path, max_cases: int = 8, batch_size: int = 8) -> dict:
    """`trace_framing` over the bank's first `max_cases` flips three ways, one after the other: as
    the command runs it (each batch's prompts before the questions once, every forward on the
    questions alone: `suffix`), on whole prompts with each film through the tower once
    (`whole`), and on whole prompts with the tower in every forward (`whole_every`, the function
    outside `distinct_images`); with the language model's forwards and tokens and the tower runs
    each made (at 896 px on a CPU a whole-prompt batch takes minutes, so each path runs once).
    The paths agree as margins: a restored share times the framing's effect (the random model's
    flips sit at the boundary, so effects, the shares' denominators, can be small)."""
    vlm, flipbank = HookedVLM.from_pretrained(model), load_flipbank(bank)
    towers, tokens = counters(vlm)
    paths = {
        "suffix": trace_framing,
        "whole": functools.partial(trace_framing, fast=False),
        "whole_every": functools.partial(trace_framing.__wrapped__, fast=False),
    }
    seconds, counts, traced = {}, {}, {}
    for name, trace in paths.items():
        towers.clear()
        tokens.clear()
        vlm.image_memo.clear()  # each path encodes its own films, as it would run alone
        start = time.perf_counter()
        traced[name] = trace(vlm, flipbank, max_cases=max_cases, batch_size=batch_size, progress=False)
        seconds[name] = time.perf_counter() - start
        counts[name] = {"forwards": len(tokens), "tokens": sum(tokens), "tower_runs": len(towers)}
    base = traced["whole_every"]
    scale = np.abs(base.effect)[:, None, None]  # a share of a small effect is a small margin
    traced_ids = set(traced["suffix"].case_ids)
    return {
        "flips": len(traced_ids),
        "films": len({case["image"] for case in flipbank.flips if case["id"] in traced_ids}),
        "layers": vlm.n_layers,
        "seconds": seconds,
        "ratio_whole_every_to_suffix": seconds["whole_every"] / seconds["suffix"],
        "ratio_whole_to_suffix": seconds["whole"] / seconds["suffix"],
        "ratio_whole_every_to_whole": seconds["whole_every"] / seconds["whole"],
        "counts": counts,
        "min_abs_effect": float(scale.min()),
        "max_abs_restored_diff": max(float(np.abs(t.restored - base.restored).max()) for t in traced.values()),
        "max_abs_restored_margin_diff": max(
            float((np.abs(t.restored - base.restored) * scale).max()) for t in traced.values()
        ),
    }


def head_paths(model: Path, bank: Path, max_cases: int = 8, batch_size: int = 8) -> dict:
    """`trace_heads` (every head of every layer restored and removed at the last position) over the
    bank's first `max_cases` flips two ways, one after the other: as `flipscope trace --heads` runs
    it, on the questions alone (`suffix`), and on whole prompts with each film through the tower
    once (`whole`); with the forwards and tokens each made (each path's one whole-prompt forward
    that reads the heads' patterns among them). The paths agree as margins: a share times the
    framing's effect; the patterns are read on whole prompts either way, so they agree exactly."""
    vlm, flipbank = HookedVLM.from_pretrained(model), load_flipbank(bank)
    towers, tokens = counters(vlm)
    seconds, counts, traced = {}, {}, {}
    for name, fast in (("suffix", True), ("whole", False)):
        towers.clear()
        tokens.clear()
        vlm.image_memo.clear()
        start = time.perf_counter()
        traced[name] = trace_heads(vlm, flipbank, max_cases=max_cases, batch_size=batch_size, progress=False, fast=fast)
        seconds[name] = time.perf_counter() - start
        counts[name] = {"forwards": len(tokens), "tokens": sum(tokens), "tower_runs": len(towers)}
    suffix, whole = traced["suffix"], traced["whole"]
    effect = np.abs(trace_framing(vlm, flipbank, layers=[0], max_cases=max_cases, progress=False).effect)
    diffs = [np.abs(suffix.restored - whole.restored), np.abs(suffix.removed - whole.removed)]
    margin_diff = max(float((d * effect[:, None, None]).max()) for d in diffs)
    margin_diff = max(margin_diff, float((np.abs(suffix.whole - whole.whole) * effect[:, None]).max()))
    return {
        "flips": len(suffix.case_ids),
        "layers": vlm.n_layers,
        "heads": suffix.n_heads,
        "seconds": seconds,
        "ratio_whole_to_suffix": seconds["whole"] / seconds["suffix"],
        "counts": counts,
        "max_abs_margin_diff": margin_diff,
        "max_abs_looks_diff": float(np.abs(suffix.looks - whole.looks).max()),
    }


def stream_paths(model: Path, bank: Path, n_cases: int = 2, rounds: int = 2) -> dict:
    """Caching activations alone (an SAE's training stream, a site's encoding, the projector's read)
    two ways, interleaved round by round: a forward that ends once the hook is cached
    (`HookedVLM.cache_activations`) against the whole forward with the last position's logits
    (`run_with_cache(..., logits_to_keep=1)`); at the entry site (layer 0's attention), the last
    layer's residual and the projector, on the first `n_cases` flips' two prompts in one batch, with
    their films and with none (the stream's text-only condition)."""
    vlm, flipbank = HookedVLM.from_pretrained(model), load_flipbank(bank)
    specs = [case_spec(c, text) for c in flipbank.flips[:n_cases] for text in (c["original"], c["paraphrase"])]
    text_hooks = ["blocks.0.hook_attn_out", f"blocks.{vlm.n_layers - 1}.hook_resid_post"]
    runs = [("films", vlm.prompts.build(specs), h) for h in [*text_hooks, "projector.hook_out"]]
    runs += [("no film", vlm.prompts.build([replace(p, condition="none") for p in specs]), h) for h in text_hooks]
    seconds: dict = {(batch, hook, way): [] for batch, _, hook in runs for way in ("stopped", "whole")}
    diffs = {(batch, hook): 0.0 for batch, _, hook in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, batch, hook in runs:
                start = time.perf_counter()
                stopped = vlm.cache_activations(batch, names_filter=hook)[hook]
                seconds[name, hook, "stopped"].append(time.perf_counter() - start)
                start = time.perf_counter()
                whole = vlm.run_with_cache(batch, names_filter=hook, logits_to_keep=1)[1][hook]
                seconds[name, hook, "whole"].append(time.perf_counter() - start)
                diffs[name, hook] = max(diffs[name, hook], float((stopped - whole).abs().max()))
    report: dict = {"prompts": len(specs), "layers": vlm.n_layers, "rounds": rounds, "paths": []}
    for name, _, hook in runs:
        stopped_s, whole_s = (float(np.median(seconds[name, hook, way])) for way in ("stopped", "whole"))
        report["paths"].append({"batch": name, "hook": hook, "stopped_s": stopped_s, "whole_s": whole_s,
                                "ratio": whole_s / stopped_s, "max_abs_diff": diffs[name, hook]})  # fmt: skip
    return report


def discovery_paths(model: Path, sae_path: Path, bank: Path, n_features: int = 5, batch_size: int = 8) -> dict:
    """The three steps of `discover` that run the model, each two ways one after the other: caching
    the pairs (a film's prompts before the questions once a batch, against whole prompts), attribution
    (forward and backward on the questions alone, against whole prompts) and the exact ablation of
    `n_features` features (the last-token path, against a full forward per feature); with the
    language model's tokens and the tower's runs each made, and how far the two ways differ."""
    vlm, sae, flipbank = HookedVLM.from_pretrained(model), load_sae(sae_path), load_flipbank(bank)
    hook = check_sae(sae, vlm)
    towers, tokens = counters(vlm)
    pairs = collect_pairs(vlm, flipbank, [hook], batch_size=batch_size, progress=False)
    delta = pairs.feature_delta(sae, hook)[torch.from_numpy(pairs.is_flip)].abs().mean(0)
    features = delta.argsort(descending=True)[:n_features].tolist()
    steps = {
        "pairs": lambda fast: collect_pairs(vlm, flipbank, [hook], batch_size=batch_size, fast=fast, progress=False),
        "attribution": lambda fast: attribution_scores(
            vlm, sae, hook, pairs, batch_size=batch_size, fast=fast, progress=False
        ),
        "exact_ablation": lambda fast: exact_ablation_effects(
            vlm, sae, hook, pairs, features, batch_size=batch_size, fast=fast, progress=False
        ),
    }
    report: dict = {"flips": int(pairs.is_flip.sum()), "cases": len(pairs.cases), "features": features}
    for name, step in steps.items():
        row: dict = {}
        outputs = {}
        for fast in (True, False):
            towers.clear()
            tokens.clear()
            vlm.image_memo.clear()  # each path encodes its own films, as it would run alone
            start = time.perf_counter()
            outputs[fast] = step(fast)
            path = "fast" if fast else "whole"
            row[f"{path}_s"] = time.perf_counter() - start
            row[f"{path}_tokens"], row[f"{path}_tower_runs"] = sum(tokens), len(towers)
        row["ratio"] = row["whole_s"] / row["fast_s"]
        if name == "pairs":
            fast_pairs, whole_pairs = outputs[True], outputs[False]
            row["max_abs_diff"] = max(
                float((fast_pairs.margin_para - whole_pairs.margin_para).abs().max()),
                float((fast_pairs.para[hook] - whole_pairs.para[hook]).abs().max()),
            )
        else:
            row["max_abs_diff"] = float(np.abs(outputs[True] - outputs[False]).max())
        report[name] = row
    return report


def top_features(path: Path) -> list[int]:
    table = json.loads(path.read_text())["features"]  # ranked as `flipscope discover` prints them
    return [int(row["feature"]) for row in table[:3]]


def precision(model: Path, questions: Path, dtypes: list[torch.dtype]) -> dict:
    """Margins of one film's ten wordings and ten with the blank stand-in on plain batches and on
    the shared-prefix path in each of `dtypes`, and each dtype's against float32."""
    loaded = load_questions(questions)
    film = load_image(loaded[0].image)
    image = [PromptSpec(question=p, image=film) for p in loaded[0].prompts]
    blank = [PromptSpec(question=p, condition="blank") for p in loaded[1].prompts]
    margins, report = {}, {"n_prompts": len(image) + len(blank)}
    for dtype in dtypes:
        vlm = HookedVLM.from_pretrained(model, dtype=dtype)
        with torch.no_grad(), vlm.distinct_images():  # whole prompts, the tower once per batch
            batched = torch.cat([vlm.score(vlm.prompts.build(group)) for group in (image, blank)]).double()
            prefix = torch.cat([vlm.score_shared_prefix(group) for group in (image, blank)]).double()
        name = str(dtype).removeprefix("torch.")
        margins[name] = batched
        report[f"max_abs_prefix_vs_batched_{name}"] = float((prefix - batched).abs().max())
        if name != "float32":
            report[f"max_abs_{name}_vs_float32"] = float((batched - margins["float32"]).abs().max())
            report[f"sign_agreement_{name}_vs_float32"] = float(
                (torch.sign(batched) == torch.sign(margins["float32"])).double().mean()
            )
        del vlm
    report["margin_sd_float32"] = float(margins["float32"].std())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2, help="decoder layers (MedGemma 4B: 34)")
    parser.add_argument("--films", type=int, default=2, help="organism films; 4 questions × 10 wordings each")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run in order ('' for none)")
    parser.add_argument(
        "--bf16", action="store_true", help="also compare bfloat16 (needs a CPU with native bf16 matmuls)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/medgemma_shape.json"))
    args = parser.parse_args()
    flipscope = str(Path(shutil.which("flipscope") or Path(sys.executable).parent / "flipscope"))
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    report: dict = {"depth": args.depth, "machine": platform.machine(), "cpus": os.cpu_count(), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        questions = export_questions(cfg, work / "data", n_films=args.films)
        start = time.perf_counter()
        model, sae = build(work, questions, args.depth)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        report["model"] = shape_summary(json.loads((model / "config.json").read_text()))
        features: list[int] = []
        bank = work / "bank" / "flipbank.json"
        in_process = {
            "bank-patch": ("bank_patch", lambda: medgemma_bank_patch(model, sae, bank)),
            "count": ("feature_count", lambda: medgemma_count(model, sae, bank)),
            "trace": ("trace", lambda: trace_paths(model, bank)),
            "heads": ("heads", lambda: head_paths(model, bank)),
            "discovery-paths": ("discovery_paths", lambda: discovery_paths(model, sae, bank)),
            "rank1": ("rank1", lambda: medgemma_rank1(model, args.depth // 2, bank)),
            "stream": ("stream", lambda: stream_paths(model, bank)),
            "memo": ("memo", lambda: medgemma_memo(model, sae, bank)),
            "dashboard": ("dashboard", lambda: medgemma_dashboard(model, sae, bank)),
            "guard": ("guard", lambda: guard_run_paths(HookedVLM.from_pretrained(model), load_questions(questions))),
        }
        for stage in [s for s in args.stages.split(",") if s]:
            if stage in in_process:
                key, run = in_process[stage]
                report[key] = run()
                lines = {"bank-patch": bank_patch_line, "count": count_line}
                line = lines[stage](report[key]) if stage in lines else f"{stage}: {json.dumps(report[key])}"
                print(line, flush=True)
                continue
            command = stage_commands(model, sae, questions, work, features)[stage]
            gb, seconds = peak_rss([flipscope, *command])
            report["stages"][stage] = {"peak_rss_gb": round(gb, 3), "seconds": round(seconds, 1)}
            print(f"{stage:>9}: peak RSS {gb:6.2f} GB  {seconds:6.1f} s", flush=True)
            if stage == "curate":
                cases = json.loads(bank.read_text())
                report["flipbank"] = {"flips": len(cases["flips"]), "controls": len(cases.get("controls", []))}
            if stage == "discover":
                features = top_features(work / "f.json")
                report["top_features"] = features
        dtypes = [torch.float32, torch.bfloat16] if args.bf16 else [torch.float32]
        report["precision"] = precision(model, questions, dtypes)
    print(json.dumps(report["precision"], indent=2))
    write_json(args.out, report, indent=2)


if __name__ == "__main__":
    main()
