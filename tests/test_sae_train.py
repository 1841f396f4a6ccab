"""`flipscope sae train` gives a model with no GemmaScope a dictionary at any site: on the tiny
LLaVA checkpoint, at layer 0's attention output, the SAE loads through `load_sae`, reconstructs
held-out questions' activations far better than its mean, reports FVU and L0, and discovery runs on
it; TopK trains too; bad settings are refused before any forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.curation import CurationRules, curate
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header
from flipscope.errors import FlipscopeError
from flipscope.experiments.discovery import discover
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.kernels import kernel_settings
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.shapes import centre_answer_readout
from flipscope.sae.load import load_sae
from flipscope.sae.train import SAETrainConfig, sae_stats, save_trained_sae, site_activations, train_sae
from tests.test_families import _save
from tests.test_family_eval import _write_questions

SITE = "blocks.0.hook_attn_out"


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny LLaVA checkpoint with its yes/no readout centred on its own prompts, so wordings flip."""
    root = tmp_path_factory.mktemp("sae-train")
    vlm = HookedVLM.from_pretrained(_save("llava", root / "models"))
    questions = _write_questions(root / "data", text=False)
    specs = [PromptSpec(question=p, image=q.image) for q in load_questions(questions) for p in q.prompts]
    _, cache = vlm.run_with_cache(vlm.prompts.build(specs), names_filter="ln_final.hook_normalized", positions="last")
    tokens = vlm.answer_tokens
    centre_answer_readout(vlm.hf_model, tokens.yes_ids, tokens.no_ids, cache["ln_final.hook_normalized"], seed=1)
    vlm.hf_model.save_pretrained(root / "centred")
    vlm.processor.save_pretrained(root / "centred")
    return root / "centred", questions


def test_sae_train_on_llava_at_a_chosen_site_loads_and_discovery_runs_on_it(llava, tmp_path: Path) -> None:
    checkpoint, questions = llava
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", str(checkpoint), "--questions", str(questions), "--hook", SITE,
            "--out", str(out), "--d-sae", "64", "--l0", "6", "--steps", "600", "--lr", "5e-3", "--batch", "64",
            "--held-out", "0.25"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "training.json").read_text())
    assert report["hook"] == SITE and report["questions"] == {"train": 3, "held_out": 1}
    assert report["kernels"] == kernel_settings()
    held = report["held_out"]
    assert f"FVU {held['fvu']:.3f}" in result.output and f"L0 {held['l0']:.1f}" in result.output
    assert held["fvu"] < 0.5 and 1 < held["l0"] < 12 and held["n_tokens"] > 0

    vlm = HookedVLM.from_pretrained(checkpoint)
    sae = load_sae(out)
    assert sae.cfg.metadata.hook_name == SITE and sae.cfg.d_in == vlm.d_model and sae.cfg.d_sae == 64
    loaded = load_questions(questions)
    store = run_sweep(vlm, loaded, EvalConfig(conditions=("image",)), tmp_path / "e.jsonl", progress=False)
    bank = curate(iter_rows(store.path), loaded, CurationRules(), source=read_header(store.path))
    assert bank["n_flips"] >= 1
    found = discover(vlm, sae, bank, exact_top=0, progress=False)
    assert len(found.table) == 64 and found.table["feature"].between(0, 63).all()


def test_bad_settings_are_refused_before_any_forward(llava, tmp_path: Path) -> None:
    checkpoint, questions = llava
    with pytest.raises(FlipscopeError, match="architecture 'relu' is unknown"):
        SAETrainConfig(architecture="relu")
    with pytest.raises(FlipscopeError, match="held_out 1.0"):
        SAETrainConfig(held_out=1.0)
    result = CliRunner().invoke(app, ["sae", "train", "--model", str(checkpoint), "--questions", str(questions),
                                      "--hook", "blocks.99.hook_attn_out", "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2 and "unknown hook name 'blocks.99.hook_attn_out'" in result.output
    assert not (tmp_path / "x" / "cfg.json").exists()
    pattern = "blocks.0.attn.hook_pattern"
    result = CliRunner().invoke(app, ["sae", "train", "--model", str(checkpoint), "--questions", str(questions),
                                      "--hook", pattern, "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2 and "blocks.0.attn.hook_pattern is an attention pattern" in result.output
    assert "use blocks.0.attn.hook_z" in result.output and not (tmp_path / "x" / "cfg.json").exists()


def test_topk_trains_with_exactly_k_features_on(llava, tmp_path: Path) -> None:
    checkpoint, questions = llava
    vlm = HookedVLM.from_pretrained(checkpoint)
    specs = [PromptSpec(question=p, image=q.image) for q in load_questions(questions) for p in q.prompts]
    acts = site_activations(vlm, specs, SITE, progress=False)
    trained = train_sae(acts, SAETrainConfig(architecture="topk", d_sae=32, target_l0=4.0, steps=200, batch=64),
                        hook_name=SITE, model_name="tiny-llava")  # fmt: skip
    sae = save_trained_sae(trained, tmp_path / "topk")
    assert type(sae).__name__ == "TopKSAE" and load_sae(tmp_path / "topk").cfg.metadata.hook_name == SITE
    with torch.no_grad():
        on = (sae.encode(acts) > 0).sum(-1)
    assert int(on.max()) <= 4 and float(on.float().mean()) > 3
    assert sae_stats(sae, acts)["fvu"] < 0.5
