"""`flipscope evaluate` on every family's tiny checkpoint under every condition it supports: the
shared-prefix path equals the naive per-prompt forward where the family enables it, the header says
why where it does not; and a custom model adapter (the class below) evaluates end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.curation import CurationRules, curate
from flipscope.data.flipbank import load_flipbank, save_flipbank
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.directions import diffmean_direction
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.pairs import collect_pairs, pair_specs
from flipscope.experiments.patching import POSITIONS
from flipscope.experiments.sweeps import layer_sweep
from flipscope.interventions.edited import DirectionAblatedVLM
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.adapter import load_model_adapter
from flipscope.model.shapes import centre_answer_readout
from flipscope.model.suffix import SuffixRuns, batch_runs
from tests.test_families import FAMILIES, _save

QUESTIONS = [
    ("q1", 0, "is there an effusion ?", ["do you see any pleural effusion ?", "is there a pleural effusion ?"]),
    ("q2", 1, "are the lungs clear ?", ["do you see clear lungs ?", "are the lungs clear in this film ?"]),
    ("q3", 2, "is there any opacity ?", ["do you see an opacity ?", "is there an opacity in the lungs ?"]),
    ("q4", 0, "is there an opacity ?", ["do you see any opacity in this film ?", "any opacity ?"]),
]
PASSAGES = ["the film shows a pleural effusion .", "the lungs are clear .", "there is an opacity in the lungs ."]


def _write_questions(root: Path, text: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for qid, film, question, paraphrases in QUESTIONS:
        row = {"id": qid, "finding": "effusion", "answer": "yes", "question": question, "paraphrases": paraphrases}
        if text:
            row["context"] = PASSAGES[film]
        else:
            size = (48 + 8 * film, 40)
            pixels = np.random.default_rng(film).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"film{film}.png")
            row["image"] = f"film{film}.png"
        lines.append(json.dumps(row))
    path = root / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("family-eval")


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_runs_every_condition_and_the_fast_path_equals_the_naive_forward(root: Path, family: str) -> None:
    checkpoint = _save(family, root / "models")
    vlm = HookedVLM.from_pretrained(checkpoint, family="generic" if family == "generic" else None)
    text = vlm.family.evidence == "text"
    questions = _write_questions(root / f"data-{family}", text)
    conditions = ",".join(vlm.family.conditions)
    out = root / f"out-{family}"
    args = ["evaluate", "--model", str(checkpoint), "--questions", str(questions), "--conditions", conditions]
    args += ["--out", str(out), "--batch-size", "5"] + (["--family", "generic"] if family == "generic" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(iter_rows(out / "results.jsonl"))
    assert len(rows) == len(QUESTIONS) * 3 * len(vlm.family.conditions)
    assert {r["condition"] for r in rows} == set(vlm.family.conditions)
    assert all(np.isfinite(r["margin"]) for r in rows)
    header = read_header(out / "results.jsonl")
    naive = run_sweep(
        vlm,
        load_questions(questions),
        EvalConfig(conditions=vlm.family.conditions, fast=False, batch_size=5),
        root / f"naive-{family}.jsonl",
        progress=False,
    )
    naive_rows = {(r["question_id"], r["prompt_index"], r["condition"]): r["margin"] for r in iter_rows(naive.path)}
    got = np.array([r["margin"] for r in rows])
    want = np.array([naive_rows[(r["question_id"], r["prompt_index"], r["condition"])] for r in rows])
    if vlm.family.fast_path_off is None:
        assert header["path"] == "shared-prefix"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    else:
        assert header["path"] == "batched"
        assert header["path_reason"] == vlm.family.fast_path_off
        np.testing.assert_array_equal(got, want)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n_questions"] == len(QUESTIONS)


def test_a_text_model_refuses_image_conditions_and_questions_without_context(root: Path) -> None:
    checkpoint = _save("gemma3_text", root / "models-refuse")
    questions = _write_questions(root / "data-refuse", text=False)
    result = CliRunner().invoke(
        app, ["evaluate", "--model", str(checkpoint), "--questions", str(questions), "--out", str(root / "refused")]
    )
    assert result.exit_code == 2
    assert "field 'context' is missing on 4 question(s)" in result.output
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", str(checkpoint), "--questions", str(questions), "--conditions", "context,blank"]
        + ["--out", str(root / "refused")],
    )
    assert result.exit_code == 2
    assert "have no meaning for a gemma3_text model; its conditions: context, none, swap" in result.output
    assert not (root / "refused" / "results.jsonl").exists()


class TinyLlavaAdapter:
    """A model adapter as a user writes one: loads a LLaVA checkpoint its own way and scores the
    yes-minus-no margin at the last prompt token, one prompt at a time."""

    conditions = ("image", "blank", "none", "swap")

    def __init__(self, model: str) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(model).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        tokenizer = self.processor.tokenizer
        self.yes, self.no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")

    def build(self, prompts: list) -> list:
        batch = []
        for prompt in prompts:
            content = [{"type": "image", "image": prompt.image}] if prompt.image is not None else []
            messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt.question}]}]
            batch.append(
                self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
            )
        return batch

    @torch.no_grad()
    def score(self, batch: list) -> torch.Tensor:
        logits = [self.model(**inputs).logits[0, -1] for inputs in batch]
        return torch.stack([row[self.yes] - row[self.no] for row in logits])

    def hook_sites(self) -> dict:
        return {"blocks.0.hook_resid_post": self.model.model.language_model.layers[0]}


def test_a_custom_model_adapter_evaluates_end_to_end(root: Path) -> None:
    checkpoint = _save("llava", root / "models-custom")
    questions = _write_questions(root / "data-custom", text=False)
    out = root / "custom"
    args = ["evaluate", "--model", str(checkpoint), "--questions", str(questions), "--conditions", "image,none"]
    args += ["--out", str(out), "--model-adapter", f"{Path(__file__)}:TinyLlavaAdapter"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    header = read_header(out / "results.jsonl")
    assert header["model"]["adapter_class"] == "TinyLlavaAdapter"
    assert header["path"] == "batched"
    rows = list(iter_rows(out / "results.jsonl"))
    vlm = HookedVLM.from_pretrained(checkpoint)
    reference = run_sweep(
        vlm, load_questions(questions), EvalConfig(conditions=("image", "none")), root / "custom-ref.jsonl"
    )
    want = {(r["question_id"], r["prompt_index"], r["condition"]): r["margin"] for r in iter_rows(reference.path)}
    got = np.array([r["margin"] for r in rows])
    expected = [want[(r["question_id"], r["prompt_index"], r["condition"])] for r in rows]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_model_adapter_caches_its_sites_across_its_separate_forwards(root: Path) -> None:
    """The adapter above runs one forward per prompt: each fires its site once, and the cache joins
    them along the batch, each row the activation of its own prompt's forward."""
    adapted = load_model_adapter(f"{Path(__file__)}:TinyLlavaAdapter", str(_save("llava", root / "models-cache")))
    site = "blocks.0.hook_resid_post"
    same = [PromptSpec(question=q, condition="none") for q in ("Is there an effusion?", "Is there an opacity?")]
    margins, cache = adapted.run_with_cache(adapted.prompts.build(same), names_filter=site)
    assert list(cache) == [site] and cache[site].shape[0] == 2
    for row, spec in enumerate(same):
        alone = adapted.cache_activations(adapted.prompts.build([spec]), names_filter=[site])[site]
        torch.testing.assert_close(cache[site][row : row + 1], alone, atol=0, rtol=0)
    torch.testing.assert_close(margins, adapted.score(adapted.prompts.build(same)), atol=0, rtol=0)
    longer = [same[0], PromptSpec(question="Do you see any pleural effusion in this film?", condition="none")]
    with pytest.raises(FlipscopeError, match="fired 2 times with shapes .*cache one prompt at a time"):
        adapted.cache_activations(adapted.prompts.build(longer), names_filter=site)
    with pytest.raises(FlipscopeError, match="unknown hook name 'blocks.9.hook_resid_post'; valid names: blocks"):
        adapted.cache_activations(adapted.prompts.build(same), names_filter=["blocks.9.hook_resid_post"])
    assert not any(point.fwd_hooks for point in adapted.hook_dict.values())


def test_a_model_adapter_spec_that_does_not_load_is_one_line(root: Path) -> None:
    questions = _write_questions(root / "data-bad-adapter", text=False)
    for spec, expected in [
        ("nowhere.py:Cls", "file 'nowhere.py' does not exist"),
        (f"{Path(__file__)}:Missing", "has no Missing"),
        (f"{Path(__file__)}:QUESTIONS", "lacks build, score"),
        ("no-colon", "expected path/to/file.py:Class"),
    ]:
        result = CliRunner().invoke(
            app,
            ["evaluate", "--model", "x", "--questions", str(questions), "--out", str(root / "bad-adapter")]
            + ["--model-adapter", spec],
        )
        assert result.exit_code == 2, (spec, result.output)
        assert expected in result.output, (spec, result.output)


@pytest.mark.parametrize("family", FAMILIES)
def test_sae_free_stages_run_on_every_family(root: Path, family: str, tmp_path: Path) -> None:
    """FlipBank curation, original-value patching, the DiffMean direction and its ablation on
    each family (a text model's cases carry their context passage instead of an image)."""
    checkpoint = _save(family, root / "models")
    vlm = HookedVLM.from_pretrained(checkpoint, family="generic" if family == "generic" else None)
    text = vlm.family.evidence == "text"
    questions = load_questions(_write_questions(root / f"data-{family}", text))
    condition = vlm.family.conditions[0]
    specs = [PromptSpec(question=p, condition=condition, image=q.image, context=q.context) for q in questions
             for p in q.prompts]  # fmt: skip
    _, cache = vlm.run_with_cache(vlm.prompts.build(specs), names_filter="ln_final.hook_normalized", positions="last")
    tokens = vlm.answer_tokens  # a random model answers alike; put its readout at the boundary so wordings flip
    centre_answer_readout(vlm.hf_model, tokens.yes_ids, tokens.no_ids, cache["ln_final.hook_normalized"], seed=1)
    store = run_sweep(vlm, questions, EvalConfig(conditions=(condition,)), tmp_path / "e.jsonl", progress=False)
    bank = curate(iter_rows(store.path), questions, CurationRules(), source=read_header(store.path))
    assert bank["n_flips"] >= 1 and bank["n_controls"] >= 1, (bank["n_flips"], bank["n_controls"])
    assert all((c.get("context") is not None) == text and (c["image"] is None) == text for c in bank.cases)
    bank = load_flipbank(save_flipbank(bank, tmp_path / "bank" / "flipbank.json"))
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(vlm.n_layers)]
    pairs = collect_pairs(vlm, bank, hooks, progress=False)  # refuses a bank whose margins it cannot reproduce
    rows = read_rows(layer_sweep(vlm, bank, tmp_path / "layers.jsonl", pairs=pairs, progress=False).path)
    last = [r for r in rows if r["variant"] == vlm.n_layers - 1 and r["kind"] == "flip"]
    np.testing.assert_allclose([r["m_patched"] for r in last], [r["m_orig"] for r in last], atol=1e-4)
    middle = hooks[vlm.n_layers // 2]
    direction = diffmean_direction(pairs, middle)
    ablated = DirectionAblatedVLM(vlm, middle, direction)
    specs, _, para = pair_specs(bank.cases)
    batch = vlm.prompts.build([specs[i] for i in para])
    moved = (ablated.score(batch) - vlm.score(batch)).abs().max()
    assert 0 < float(moved) < float("inf")
    _span_patch_and_dashboard_read_the_template(vlm, bank, pairs, middle)


def _random_sae(vlm, hook: str, d_sae: int = 16):
    """A JumpReLU SAE of random directions at `hook`, thresholds at 0, so half its features fire."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = JumpReLUSAEConfig(d_in=vlm.d_model, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=False,
                            normalize_activations="none", metadata=SAEMetadata(hook_name=hook))  # fmt: skip
    sae = JumpReLUSAE(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(vlm.d_model, d_sae, generator=generator))
        sae.W_dec.copy_(torch.randn(d_sae, vlm.d_model, generator=generator) / vlm.d_model**0.5)
        sae.threshold.zero_()
    return sae


def _span_patch_and_dashboard_read_the_template(vlm, bank, pairs, middle: str) -> None:
    """On each family's own template: at the last layer a patch over the question and the tail
    equals the last position's (only it reaches the logits there), the question alone moves
    nothing; and the dashboard reads the same features with the part before the question run
    once (where the family has that path) as on whole prompts, and finds the same tokens before
    the question, with the same activations, in each case's two wordings."""
    from flipscope.experiments.dashboard import feature_dashboard
    from flipscope.experiments.patching import patch_bank

    last_hook = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    sae = _random_sae(vlm, last_hook)
    kw = {"control_features": None, "progress": False}
    last_pairs = collect_pairs(vlm, bank, [last_hook], progress=False)
    runs = {p: patch_bank(vlm, sae, bank, range(16), positions=p, pairs=last_pairs, **kw).rows for p in POSITIONS}
    margins = {p: np.array([r["m_patched"] for r in rows]) for p, rows in runs.items()}
    para = np.array([r["m_para"] for r in runs["last"]])
    assert np.abs(margins["last"] - para).max() > 1e-3  # the patch reaches the margin
    np.testing.assert_allclose(margins["all"], margins["last"], atol=1e-4)
    np.testing.assert_allclose(margins["question"], para, atol=1e-4)
    one = {**bank, "flips": bank["flips"][:1], "controls": []}
    middle_sae = _random_sae(vlm, middle)
    specs = pair_specs(one["flips"])[0]
    inputs = vlm.prompts.build(specs)
    runs = batch_runs(vlm, inputs, vlm.prompts.question_mask(specs, inputs))
    assert isinstance(runs, SuffixRuns) == (vlm.fast_path_off is None)  # the dashboard's path is the same
    seg = feature_dashboard(vlm, middle_sae, one, range(16), effects=0, progress=False)["features"]
    whole = feature_dashboard(vlm, middle_sae, one, range(16), effects=0, fast=False, progress=False)["features"]
    for f, found in seg.items():  # each film's prompt before the question run once, or with every wording
        for group, places in found["segments"].items():
            for place, value in places.items():
                expected = whole[f]["segments"][group][place]
                assert value == expected if place == "n_prompts" else value["n"] == expected["n"]
                if place != "n_prompts" and value["mean"] is not None:
                    assert value["mean"] == pytest.approx(expected["mean"], rel=1e-4, abs=1e-5)
    for found in seg.values():
        original, paraphrase = found["segments"]["originals"], found["segments"]["paraphrases"]
        assert original["tail"]["n"] == paraphrase["tail"]["n"] > 0
        assert original["before question"]["n"] == paraphrase["before question"]["n"] > 0
        for place in ("image", "before question"):
            if original[place]["n"]:
                assert original[place]["mean"] == pytest.approx(paraphrase[place]["mean"], rel=1e-4, abs=1e-5)
