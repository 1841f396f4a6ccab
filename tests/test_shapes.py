"""MedGemma 4B's shapes without its weights: the config, a random GemmaScope 2 SAE, a readout at
the decision boundary, and the benchmarks that run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.shapes import (
    MEDGEMMA_4B,
    centre_answer_readout,
    medgemma_4b_config,
    save_random_gemmascope_sae,
)
from flipscope.model.tiny import TinyVLMConfig, build_tiny_vlm
from flipscope.sae.load import load_sae

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_the_config_is_medgemma_4b_at_any_depth() -> None:
    """The HF config built at full depth has MedGemma 4B's published values (google/medgemma-4b-it)."""
    from transformers import Gemma3Config

    full = medgemma_4b_config(["yes", "no"])
    assert (full.text_layers, full.vision_layers) == (34, 27)
    meta = torch.device("meta")
    model, _ = build_tiny_vlm(medgemma_4b_config(["yes", "no"], depth=34), device=meta)
    config: Gemma3Config = model.config
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2560, 10240, 34)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (8, 4, 256)
    assert (text.vocab_size, text.sliding_window, text.query_pre_attn_scalar) == (262_208, 1024, 256)
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    globals_ = [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"]
    assert globals_ == [5, 11, 17, 23, 29, 33]  # 5:1 local:global, and the last layer global
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1152, 4304, 27)
    assert (vision.num_attention_heads, vision.image_size, vision.patch_size) == (16, 896, 14)
    assert config.mm_tokens_per_image == 256
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.2e9 < n_params < 4.4e9  # MedGemma 4B: 4.3B parameters
    assert medgemma_4b_config(["yes"], depth=2).vision_layers == 2
    assert MEDGEMMA_4B["vocab_size"] == 262_208
    with pytest.raises(ValueError, match="1..34"):
        medgemma_4b_config(["yes"], depth=35)


def test_a_random_gemmascope_sae_loads_through_sae_lens_at_its_l0(tmp_path: Path) -> None:
    folder = save_random_gemmascope_sae(tmp_path, d_in=256, layer=17, d_sae=4096, l0=64.0)
    assert folder.name == "layer_17_width_4k_l0_medium" and folder.parent.name == "resid_post"
    sae = load_sae(str(folder))
    assert sae.cfg.metadata.hook_name == "blocks.17.hook_resid_post"
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (256, 4096)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    l0 = (sae.encode(x) > 0).sum(dim=1).float().mean().item()
    assert 45 < l0 < 85  # about 64 features fire on a unit-variance input


def test_the_centred_readout_puts_margins_at_the_boundary() -> None:
    words = "is there an effusion do you see any ? yes no".split()
    model, processor = build_tiny_vlm(TinyVLMConfig(words=words, perturb_norms=False))
    vlm = HookedVLM(model, processor)
    specs = [
        PromptSpec(question=q, condition="blank")
        for q in ("Is there an effusion?", "Do you see an effusion?", "Is there any effusion?", "Do you see any?")
    ]
    with torch.no_grad():
        before = vlm.score(vlm.prompts.build(specs))
        inputs = vlm.prompts.build(specs)
        _, cache = vlm.run_with_cache(inputs, names_filter="ln_final.hook_normalized", positions="last")
        hidden = cache["ln_final.hook_normalized"].reshape(len(specs), -1)
        tokens = vlm.answer_tokens
        centre_answer_readout(model, tokens.yes_ids, tokens.no_ids, hidden, spread=2.0)
        after = vlm.score(vlm.prompts.build(specs))
    assert not torch.allclose(before, after)
    assert abs(after.mean().item()) < 1e-4 and after.std().item() == pytest.approx(2.0, rel=1e-4)
    assert (after > 0).any() and (after < 0).any()  # some prompts answer yes, some no


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_cpu_at_depth_one(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--depth", "1"]
    done = subprocess.run([*command, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["depth"], report["vision_depth"], report["dtype"]) == (1, 1, "float32")
    paths = report["evaluation"]["paths"]
    assert set(paths) == {"naive", "batched", "prefix"}
    assert all(p["prompts_per_s"] > 0 and p["achieved_tflops"] > 0 for p in paths.values())
    assert [row["batch_size"] for row in report["attribution_memory"]] == [1, 2]
    assert all(row["peak_gb"] > 1.0 for row in report["attribution_memory"])  # the 262k x 2560 embedding alone
    assert report["clamp_overhead"]["ratio"] > 0 and report["psf_med_sweep_hours"]["one_device"] > 0


def test_the_gpu_benchmarks_precision_check(tmp_path: Path) -> None:
    """bf16 against float32 on the same weights, as bench_gpu runs it on a GPU (here a small model:
    bf16 matmuls at MedGemma's width crawl on a CPU without native bf16)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    words = "is there an effusion do you see any ? yes no".split()
    model, processor = build_tiny_vlm(TinyVLMConfig(words=words, d_model=128, d_mlp=256, perturb_norms=False))
    vlm = HookedVLM(model, processor)
    film = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    group = [PromptSpec(question=q, image=film) for q in ("Is there an effusion?", "Do you see any effusion?")]
    report = bench.precision(vlm, group, torch.bfloat16)
    assert vlm.dtype == torch.bfloat16
    assert report["max_abs_prefix_vs_batched_float32"] < 1e-4
    assert 0 < report["max_abs_bfloat16_vs_float32"] < 0.5


@pytest.mark.slow
def test_every_stage_runs_at_medgemma_shapes(tmp_path: Path) -> None:
    """evaluate → curate → discover → patch → clamp at full widths and vocabulary, depth 2, with
    peak memory per stage (and in-process, discover's steps, the bank patch's two paths, the rank-1
    null, the trace on suffixes against whole prompts, caches from forwards that stop at their
    hook, the patch's steps with the films' tower outputs kept between them, and the guard's run
    with each film once); the shared prefix agrees with whole prompts at this width."""
    out = tmp_path / "medgemma.json"
    # every stage but the heads' and the dashboard's (timed by the benchmark, not asserted here)
    stages = ["evaluate", "curate", "discover", "discovery-paths", "patch", "bank-patch", "count", "memo", "rank1",
              "trace", "stream", "guard", "clamp"]  # fmt: skip
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_medgemma.py"), "--depth", "2", "--out", str(out),
               "--stages", ",".join(stages)]  # fmt: skip
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    text, vision = report["model"]["text"], report["model"]["vision"]
    assert (text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]) == (2560, 262_208, 2)
    assert (vision["hidden_size"], vision["image_size"], vision["num_hidden_layers"]) == (1152, 896, 2)
    assert list(report["stages"]) == ["evaluate", "curate", "discover", "patch", "clamp"]
    assert all(s["peak_rss_gb"] > 1.0 for s in report["stages"].values() if s is not report["stages"]["curate"])
    assert report["flipbank"]["flips"] > 0
    assert report["precision"]["max_abs_prefix_vs_batched_float32"] < 1e-3
    # patching's last-token path against full forwards, and rank-1's null, at these shapes
    assert report["bank_patch"]["max_margin_diff"] < 1e-3 and report["bank_patch"]["cases"] > 0
    counted = report["feature_count"]  # one count sweep against a patch_bank per count
    assert counted["max_margin_diff"] < 1e-3 and counted["cases"] == report["bank_patch"]["cases"]
    assert report["rank1"]["flips"] == report["flipbank"]["flips"] and report["rank1"]["draws"] == 256
    # discover's model-running steps on their suffix and last-token paths against whole prompts
    for step in ("pairs", "attribution", "exact_ablation"):
        row = report["discovery_paths"][step]
        assert row["max_abs_diff"] < 1e-3 and row["fast_tokens"] < row["whole_tokens"] / 2
        assert row["fast_tower_runs"] == row["whole_tower_runs"]  # each film once on both
    # the trace: each batch's prefix (its 896-px films included) run once, every forward on the questions alone
    trace, counts = report["trace"], report["trace"]["counts"]
    assert counts["suffix"]["tower_runs"] == counts["whole"]["tower_runs"] == trace["films"]  # each film once
    assert counts["whole_every"]["tower_runs"] == counts["whole_every"]["forwards"] - 1  # all but the fill's (text)
    assert counts["whole"]["tokens"] == counts["whole_every"]["tokens"] > 4 * counts["suffix"]["tokens"]
    assert trace["max_abs_restored_margin_diff"] < 1e-3  # in logits: shares times the framing's effect
    # activations alone from forwards that end at their hook: the same tensors, and no stage pages in the
    # whole 2.7 GB unembedding (the weights, 3.5 GB, are memory-mapped: a stage holds what it reads)
    paths = report["stream"]["paths"]
    assert [(p["batch"], p["hook"]) for p in paths] == [
        ("films", "blocks.0.hook_attn_out"), ("films", "blocks.1.hook_resid_post"), ("films", "projector.hook_out"),
        ("no film", "blocks.0.hook_attn_out"), ("no film", "blocks.1.hook_resid_post"),
    ]  # fmt: skip
    assert all(p["max_abs_diff"] == 0 for p in paths)
    assert report["stages"]["patch"]["peak_rss_gb"] < 3.5
    # `flipscope patch`'s steps: each film through the tower once for all of them, the same margins to the bit
    memo = report["memo"]
    assert memo["kept"]["tower_runs"] == memo["films"] < memo["none"]["tower_runs"] and memo["max_abs_diff"] == 0
    # `flipscope guard answer`: each film once for its wordings and checks, the answers and flags of the plain path
    guard = report["guard"]
    assert guard["suffix_tower_images"] == guard["memo_tower_images"] < guard["plain_tower_images"] / 4
    assert guard["suffix_decoder_tokens"] < guard["memo_decoder_tokens"] / 3  # 3,058 against 11,304
    assert guard["answers"] == 10 * guard["questions"]
    assert guard["suffix_max_margin_diff"] < 1e-3 and guard["memo_max_margin_diff"] < 1e-3
