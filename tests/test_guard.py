# ruff: noqa: E501
"""Guarding answers: opposite-label swaps pick a film of the same finding with the other truth (and
say when there is none); detectors, calibration and the guarded model on the shipped organism."""

from __future__ import annotations

from pathlib import Path

import pytest

from flipscope.data.questions import Question
from flipscope.data.store import read_rows
from flipscope.experiments.evaluation import EvalConfig, opposite_images, run_sweep
from flipscope.experiments.summary import question_table


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
