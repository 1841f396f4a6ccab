# ruff: noqa: E501
"""Guarding answers: opposite-label swaps pick a film of the same finding with the other truth (and
say when there is none); detectors, calibration and the guarded model on the shipped organism."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.data.questions import Question
from flipscope.data.store import read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import EvalConfig, opposite_images, run_sweep
from flipscope.experiments.summary import question_table

pytestmark = pytest.mark.costly(20)


def _q(qid: str, image: str, finding: str, yes: bool) -> Question:
    return Question(id=qid, image=Path(image), finding=finding, answer=yes, question="Is there x?",
                    paraphrases=("Do you see x?",))  # fmt: skip


def test_an_opposite_label_swap_shows_the_same_finding_with_the_other_truth() -> None:
    questions = [_q("a", "1.png", "opacity", True), _q("b", "2.png", "opacity", False), _q("c", "3.png", "opacity", False),
                 _q("d", "1.png", "effusion", True), _q("e", "4.png", "effusion", True)]  # fmt: skip
    partner = opposite_images(questions, seed=0)
    assert partner["a"] in (Path("2.png"), Path("3.png"))
    assert partner["b"] == partner["c"] == Path("1.png")
    assert partner["d"] is None and partner["e"] is None  # no effusion-free film: said, not filled
    assert opposite_images(questions, seed=0) == partner


@pytest.fixture(scope="module")
def organism_store(tmp_path_factory: pytest.TempPathFactory):
    from flipscope.data.questions import load_questions
    from flipscope.organism import OrganismConfig, load_organism
    from flipscope.organism.questions import export_questions

    vlm, _, card = load_organism()
    root = tmp_path_factory.mktemp("guard")
    questions = load_questions(export_questions(OrganismConfig.from_dict(card["config"]), root, n_films=40))
    cfg = EvalConfig(conditions=("image", "blank", "swap"), swap_match="opposite", batch_size=64)
    run_sweep(vlm, questions, cfg, root / "run" / "results.jsonl", progress=False)
    return vlm, questions, root / "run" / "results.jsonl"


def test_opposite_swaps_move_the_organisms_answers_more_than_the_blank_does(organism_store) -> None:
    _, questions, store = organism_store
    rows = read_rows(store)
    truth = {q.id: q.answer for q in questions}
    images = {q.id: q.image for q in questions}
    partner = opposite_images(questions, seed=0)
    swapped = {r["question_id"] for r in rows if r["condition"] == "swap"}
    assert swapped == {q for q, image in partner.items() if image is not None} and swapped
    assert all(partner[q] != images[q] for q in swapped)
    table = question_table(rows)
    changed = [e["swap_change"] for q, e in table.items() if e["swap_change"] is not None and e["correct"]]
    # the organism reads the film: an opposite film changes most correct answers (a random partner would
    # often carry the same truth)
    assert sum(changed) / len(changed) > 0.5
    assert {truth[q] for q in swapped} == {True, False}


@pytest.fixture(scope="module")
def organism_study(organism_store):
    from flipscope.experiments.detectors import probe_features, question_arrays
    from flipscope.experiments.guard import guard_study

    vlm, questions, store = organism_store
    arrays = question_arrays(read_rows(store))
    hook = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    features = probe_features(vlm, questions, arrays["id"], hook=hook)
    return arrays, guard_study(arrays, features, recall=0.9, probe_hook=hook)


def test_the_labels_keep_detector_and_target_apart_and_the_swap_defines_reliance(
    organism_store, organism_study
) -> None:
    arrays, study = organism_study
    rows = read_rows(organism_store[2])
    table = question_table(rows)
    ids = list(arrays["id"])
    survived = [e["swap_change"] is False for q, e in sorted(table.items())]
    assert [bool(v) for v in arrays["image_unreliant"]] == survived  # the label is the opposite swap's
    assert "image_unreliant" not in study["auroc"]["swap"]  # a label is never its own detector
    assert set(study["auroc"]) == {"margin", "probe", "dispersion", "blank", "swap"}
    assert len(ids) == 160 and study["n_held_out"] == 80 and set(study["calibration_ids"]) < set(ids)


def test_a_calibrated_gate_holds_its_recall_on_held_out_questions(organism_study) -> None:
    from flipscope.experiments.guard import guard_sentences

    arrays, study = organism_study
    for gate in ("margin", "probe"):
        r = study["realised_recall"][gate]
        assert r["n"] >= 10 and r["low"] <= 0.9 <= r["high"], (gate, r)
    for target in ("flip_prone",):  # flips are the organism's planted behaviour: a probe sees them
        assert study["auroc"]["probe"][target]["low"] > 0.5
    curve = study["abstention"]
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["n"] == study["n_held_out"]
    sentences = guard_sentences(study, "the organism")
    assert any("flip-prone answers are caught above chance by" in s and "probe" in s for s in sentences)
    assert not any("nan" in s.lower() for s in sentences)


def test_a_random_label_is_caught_by_nothing(organism_study) -> None:
    """The same study with the flip label shuffled: no detector may claim it."""
    from flipscope.experiments.guard import guard_sentences, guard_study

    arrays, _ = organism_study
    shuffled = dict(arrays, flip_prone=np.random.default_rng(7).permutation(arrays["flip_prone"]))
    study = guard_study(shuffled, None, recall=0.9)
    for detector in ("margin", "dispersion", "blank"):
        a = study["auroc"][detector]["flip_prone"]
        assert a["low"] <= 0.5 <= a["high"], (detector, a)
    assert not any("flip-prone answers are caught" in s for s in guard_sentences(study))


def test_the_guarded_model_answers_as_the_model_and_flags_by_its_gates(organism_store, organism_study) -> None:
    from flipscope.interventions.guarded import GuardConfig, GuardedVLM, reference_films
    from flipscope.model.prompts import PromptSpec

    vlm, questions, _ = organism_store
    _, study = organism_study
    config = GuardConfig.from_study(study, image_check="opposite")
    assert config.probe is not None and config.abs_margin == study["thresholds"]["margin"]
    held = [q for q in questions if q.id not in set(study["calibration_ids"])][:24]
    references = reference_films([q for q in questions if q.id in set(study["calibration_ids"])])
    guarded = GuardedVLM(vlm, config, references)
    specs = [PromptSpec(question=q.question, image=q.image) for q in held]
    answers = guarded.answer(specs, [q.finding for q in held], batch_size=8)
    plain = torch.cat([vlm.score(vlm.prompts.build(specs[i : i + 8])) for i in range(0, len(specs), 8)])
    assert [a.margin for a in answers] == pytest.approx(plain.tolist(), abs=1e-5)
    assert [a.answer for a in answers] == ["yes" if m > 0 else "no" for m in plain.tolist()]
    for a in answers:
        assert a.flip_prone == (abs(a.margin) <= config.abs_margin or "flip-prone" in a.reasons)
        assert a.abstain == (a.flip_prone or bool(a.image_unreliant))
    bare = GuardedVLM(vlm, GuardConfig(abs_margin=config.abs_margin))  # one pass, no probe: score's own margins
    assert [a.margin for a in bare.answer(specs[:8])] == plain[:8].tolist()
    lonely = GuardedVLM(vlm, GuardConfig(image_check="opposite"), {held[0].finding: {"yes": [], "no": []}})
    (flagged,) = lonely.answer(specs[:1], [held[0].finding])
    assert flagged.image_unreliant is None and "image reliance unknown" in flagged.reasons[0]


def test_a_guard_composes_with_a_clamp(organism_store) -> None:
    """The guard answers as the clamped model, on whole prompts bit for bit and on the suffix path."""
    from flipscope.interventions import ClampedVLM
    from flipscope.interventions.guarded import GuardConfig, GuardedVLM
    from flipscope.model.prompts import PromptSpec
    from flipscope.organism import load_organism

    vlm, questions, _ = organism_store
    _, sae, card = load_organism()
    clamped = ClampedVLM(vlm, sae, {card["framing_features"][0]["feature"]: 0.0})  # the card's top framing feature
    specs = [PromptSpec(question=q.prompts[-1], image=q.image) for q in questions[:8]]
    guarded = GuardedVLM(clamped, GuardConfig(abs_margin=1.0))
    margins = [a.margin for a in guarded.answer(specs)]
    assert margins == clamped.score(clamped.prompts.build(specs)).tolist()
    assert margins != vlm.score(vlm.prompts.build(specs)).tolist()  # the clamp is in force
    assert guarded.identity() == clamped.identity()
    # on the suffix path the clamp holds in the shared prefix's pass and the wordings' alike
    fast = [a.margin for a in guarded.answer(specs, fast=True)]
    assert max(abs(a - b) for a, b in zip(fast, margins, strict=True)) < 1e-4


def test_guard_commands_calibrate_and_report_and_refuse_a_run_without_opposite_films(organism_store, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from flipscope.cli import app
    from flipscope.organism import organism_dir

    vlm, questions, store = organism_store
    qfile = next(store.parent.parent.glob("**/questions.jsonl"))
    result = CliRunner().invoke(
        app,
        [
            "guard",
            "calibrate",
            str(store.parent),
            "--model",
            str(organism_dir()),
            "--questions",
            str(qfile),
            "--out",
            str(tmp_path / "g" / "guard.json"),
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "flip-prone answers are caught above chance by" in result.output
    study = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert (
        study["probe_hook"] == f"blocks.{vlm.n_layers - 1}.hook_resid_post"
        and study["source"]["kind"] == "flip-evaluation"
    )
    result = CliRunner().invoke(app, ["guard", "report", str(tmp_path / "g"), "--out", str(tmp_path / "r"), "--no-png"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "guard.html").read_text()
    text = re.sub(r"<script.*?</script>", "", page, flags=re.S).lower()  # the page's words, not plotly's code
    assert "defines the label" in text and "nan" not in text
    plain = tmp_path / "plain"
    run_sweep(vlm, questions[:8], EvalConfig(), plain / "results.jsonl", progress=False)
    result = CliRunner().invoke(app, ["guard", "calibrate", str(plain)])
    assert result.exit_code == 2 and "--swap-match opposite" in result.output


def test_an_imported_table_with_margins_calibrates_like_the_hooked_run(
    organism_store, organism_study, tmp_path
) -> None:
    from csvfiles import write_csv

    from flipscope.data.imported import import_answers
    from flipscope.experiments.detectors import question_arrays
    from flipscope.experiments.guard import guard_study

    _, questions, store = organism_store
    wordings = {q.id: q.prompts for q in questions}
    rows = [{"qid": r["question_id"], "k": r["prompt_index"], "text": wordings[r["question_id"]][r["prompt_index"]],
             "margin": r["margin"], "condition": r["condition"], "truth": r["truth"], "strategy": r["strategy"] or ""}
            for r in read_rows(store)]  # fmt: skip
    write_csv(tmp_path / "api.csv", rows)
    mapping = {"question_id": "qid", "variant": "k", "wording": "text"}
    imported = import_answers(tmp_path / "api.csv", tmp_path / "api", mapping, model="api", swap_match="opposite")[
        "api"
    ]
    arrays, hooked = organism_study
    study = guard_study(question_arrays(read_rows(imported)), None, recall=0.9)
    plain = guard_study(arrays, None, recall=0.9)
    assert study["auroc"] == plain["auroc"] and study["thresholds"] == plain["thresholds"]
    assert study["auroc"]["margin"] == hooked["auroc"]["margin"]
    bare = [dict(r, margin=None) for r in read_rows(imported)]
    with pytest.raises(FlipscopeError, match="no margin"):
        question_arrays(bare)


def test_the_blank_check_flags_answers_the_blank_barely_moves(organism_store) -> None:
    from flipscope.interventions.guarded import GuardConfig, GuardedVLM
    from flipscope.model.prompts import PromptSpec

    vlm, questions, _ = organism_store
    specs = [PromptSpec(question=q.question, image=q.image) for q in questions[:12]]
    margins = vlm.score(vlm.prompts.build(specs)).numpy()
    blank = vlm.score(vlm.prompts.build([PromptSpec(question=s.question, condition="blank") for s in specs])).numpy()
    moved = np.sign(margins) * (margins - blank)
    delta = float(np.median(moved))
    answers = GuardedVLM(vlm, GuardConfig(image_check="blank", blank_delta=delta)).answer(specs)
    assert [a.image_unreliant for a in answers] == [bool(m <= delta) for m in moved]
    assert any(a.image_unreliant for a in answers) and not all(a.image_unreliant for a in answers)
    with pytest.raises(FlipscopeError, match="needs blank_delta"):
        GuardConfig(image_check="blank")
