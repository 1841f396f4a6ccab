"""`flipscope guard answer`: a guard calibrated on some films answers every wording of new
questions with the model's own answers and its flags, resumes a store cut mid-unit to the same
bytes, measures what it caught, and refuses reference questions or a model it was not calibrated on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.questions import load_questions
from flipscope.data.store import read_rows
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.model.prompts import PromptSpec
from flipscope.organism import OrganismConfig, load_organism, organism_dir
from flipscope.organism.questions import export_questions

runner = CliRunner()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory):
    """A guard calibrated (with its probe) on 24 films; 6 other films' questions to answer."""
    vlm, _, card = load_organism()
    cfg = OrganismConfig.from_dict(card["config"])
    root = tmp_path_factory.mktemp("guard-run")
    reference = export_questions(cfg, root / "calibration", n_films=24)
    fresh = export_questions(cfg, root / "fresh", n_films=6, first=24)
    evaluated = EvalConfig(conditions=("image", "blank", "swap"), swap_match="opposite", batch_size=64)
    run_sweep(vlm, load_questions(reference), evaluated, root / "run" / "results.jsonl", progress=False)
    args = ["guard", "calibrate", str(root / "run"), "--model", str(organism_dir()), "--questions", str(reference)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return vlm, root / "run" / "guard.json", reference, fresh


def _answer(guard: Path, reference: Path, questions: Path, out: Path, *extra: str):
    args = ["guard", "answer", str(questions), "--guard", str(guard), "--reference", str(reference)]
    return runner.invoke(app, [*args, "--out", str(out), *extra])


def test_the_guard_answers_as_the_model_and_measures_what_it_caught(calibrated, tmp_path: Path) -> None:
    vlm, guard, reference, fresh = calibrated
    result = _answer(guard, reference, fresh, tmp_path / "a")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "a" / "answers.jsonl")
    questions = load_questions(fresh)
    assert len(rows) == sum(1 + len(q.paraphrases) for q in questions)
    specs = [PromptSpec(question=r["prompt"], image=next(q.image for q in questions if q.id == r["question_id"]))
             for r in rows]  # fmt: skip
    plain = np.concatenate([vlm.score(vlm.prompts.build(specs[i : i + 32])).numpy() for i in range(0, len(specs), 32)])
    np.testing.assert_allclose([r["margin"] for r in rows], plain, atol=1e-4)  # the model's own answers
    assert all(r["answer"] == ("yes" if r["margin"] > 0 else "no") for r in rows)
    assert all(r["abstain"] == (r["flip_prone"] or bool(r["image_unreliant"])) for r in rows)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n_answers"] == len(rows) and summary["calibration_overlap"] == 0
    assert summary["abstained"]["value"] == pytest.approx(np.mean([r["abstain"] for r in rows]))
    kept = [r["answer"] == r["truth"] for r in rows if not r["abstain"]]
    assert summary["accuracy_kept"]["value"] == pytest.approx(np.mean(kept))
    # the flip-prone gate flags the questions that flip on new films more often than the stable ones
    assert summary["flagged_flip_prone"]["value"] > summary["flagged_stable"]["value"]
    assert "answers to 24 questions" in result.output and "nan" not in result.output


def test_a_store_cut_mid_unit_resumes_to_the_same_bytes(calibrated, tmp_path: Path) -> None:
    _, guard, reference, fresh = calibrated
    assert _answer(guard, reference, fresh, tmp_path / "whole").exit_code == 0
    whole = (tmp_path / "whole" / "answers.jsonl").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = whole.splitlines(keepends=True)
    (cut / "answers.jsonl").write_bytes(b"".join(lines[: len(lines) // 2]))
    assert _answer(guard, reference, fresh, cut).exit_code == 0
    assert (cut / "answers.jsonl").read_bytes() == whole


def test_other_reference_questions_or_another_model_are_refused(calibrated, tiny_dir: Path, tmp_path: Path) -> None:
    _, guard, reference, fresh = calibrated
    wrong = _answer(guard, fresh, fresh, tmp_path / "r")
    assert wrong.exit_code == 2 and "is not the questions" in wrong.output
    other = _answer(guard, reference, fresh, tmp_path / "m", "--model", str(tiny_dir))
    assert other.exit_code == 2 and "was calibrated on another model" in other.output
    (tmp_path / "bad.json").write_text("[]")
    bad = _answer(tmp_path / "bad.json", reference, fresh, tmp_path / "b")
    assert bad.exit_code == 2 and "expected an object (a guard from" in bad.output
    assert not (tmp_path / "r" / "answers.jsonl").exists() and not (tmp_path / "m" / "answers.jsonl").exists()
    odd = _answer(guard, reference, fresh, tmp_path / "g", "--gates", "margin,dice")
    assert odd.exit_code == 2 and "--gates 'margin,dice'" in odd.output


def test_each_gate_flags_by_its_own_threshold(calibrated, tmp_path: Path) -> None:
    _, guard, reference, fresh = calibrated
    thresholds = json.loads(guard.read_text())["thresholds"]
    flagged = {}
    for gates in ("margin", "probe"):
        result = _answer(guard, reference, fresh, tmp_path / gates, "--gates", gates, "--image-check", "off")
        assert result.exit_code == 0, result.output
        rows = read_rows(tmp_path / gates / "answers.jsonl")
        assert all(r["image_unreliant"] is None and r["abstain"] == r["flip_prone"] for r in rows)
        flagged[gates] = [r["flip_prone"] for r in rows]
        if gates == "margin":
            assert flagged[gates] == [abs(r["margin"]) <= thresholds["margin"] for r in rows]
    assert flagged["margin"] != flagged["probe"]  # the probe reads the hidden state, not the margin


def test_each_film_goes_through_the_tower_once(calibrated, tmp_path: Path) -> None:
    """A question's wordings share its film, and the reference films serve many questions: with the
    memo the tower encodes each distinct film once; the answers are those of a tower run per prompt."""
    from flipscope.experiments.guard_run import guard_run
    from flipscope.interventions.guarded import GuardConfig, GuardedVLM, reference_films

    vlm, guard, reference, fresh = calibrated
    study = json.loads(guard.read_text())
    ids = set(study["calibration_ids"])
    refs = reference_films([q for q in load_questions(reference) if q.id in ids])
    questions = load_questions(fresh)
    images = [0]

    def count(module, args, kwargs, output) -> None:
        images[0] += len(args[0] if args else kwargs["pixel_values"])

    counts, margins = [], []
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(count, with_kwargs=True)
    try:
        for name, memo in (("memo", 1 << 30), ("none", 0)):
            guarded = GuardedVLM(vlm, GuardConfig.from_study(study), refs)
            guarded.image_memo.clear()
            guarded.image_memo.max_bytes = memo
            images[0] = 0
            path = guard_run(guarded, questions, tmp_path / name / "answers.jsonl", {}, progress=False)
            counts.append(images[0])
            margins.append([r["margin"] for r in read_rows(path)])
    finally:
        handle.remove()
        vlm.image_memo.max_bytes = 1 << 30
    films = {q.image for q in questions}
    # its films and at most as many references; per batch of prompts without the memo (43 against 12 here)
    assert counts[0] <= 2 * len(films) and counts[1] >= 3 * counts[0]
    np.testing.assert_allclose(margins[0], margins[1], atol=1e-5)


@pytest.mark.parametrize("check", ["opposite", "blank"])
def test_the_suffix_path_gives_the_whole_prompts_answers_probe_and_flags(
    calibrated, check: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`answer(fast=True)` runs each batch's header and film once and the wordings on its cache:
    the margins and the probe's p of whole prompts to float rounding, with fewer tokens through the
    decoder; every flag the same but where a number sits within that rounding of its threshold.
    Either way the probe reads the asked prompts' states only, not the image check's."""
    from dataclasses import replace

    from flipscope.interventions import guarded as guarded_module
    from flipscope.interventions.guarded import GuardConfig, GuardedVLM, reference_films

    vlm, guard, reference, fresh = calibrated
    study = json.loads(guard.read_text())
    config = GuardConfig.from_study(study)
    config = replace(config, image_check="blank", blank_delta=0.5) if check == "blank" else config
    assert config.probe is not None and config.abs_margin is not None
    refs = reference_films([q for q in load_questions(reference) if q.id in set(study["calibration_ids"])])
    guarded = GuardedVLM(vlm, config, refs)
    questions = load_questions(fresh)[:6]
    specs = [PromptSpec(question=p, image=q.image) for q in questions for p in q.prompts]
    findings = [q.finding for q in questions for _ in q.prompts]
    tokens, probed = [0], [0]

    def count(module, args, kwargs) -> None:
        tokens[0] += int(kwargs["inputs_embeds"].shape[:2].numel())

    def probe(fitted, x: np.ndarray, apply=guarded_module.apply_probe) -> np.ndarray:
        probed[0] += len(x)
        return apply(fitted, x)

    monkeypatch.setattr(guarded_module, "apply_probe", probe)

    handle = vlm.hf_model.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        runs = {}
        for fast in (False, True):
            tokens[0] = probed[0] = 0
            answers = guarded.answer(specs, findings, batch_size=16, fast=fast)
            assert probed[0] == len(specs)
            runs[fast] = (answers, guarded._margins(specs, 16, fast), tokens[0])
    finally:
        handle.remove()
    (whole, (m0, p0), t0), (fast, (m1, p1), t1) = runs[False], runs[True]
    np.testing.assert_allclose(m1, m0, atol=1e-4)
    np.testing.assert_allclose(p1, p0, atol=1e-4)
    assert t1 < t0 / 2  # the film's tokens once a batch, not once a wording
    near = np.abs(np.abs(m0) - config.abs_margin) < 1e-4
    near |= np.abs(p0 - config.probe_threshold) < 1e-4
    for a, b, close in zip(whole, fast, near, strict=True):
        assert a.answer == b.answer and a.image_unreliant == b.image_unreliant
        assert close or a.flip_prone == b.flip_prone
    assert any(a.image_unreliant is not None for a in fast)
