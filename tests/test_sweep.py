"""Flip evaluation on the shipped organism reproduces its ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flipscope.data.questions import load_questions
from flipscope.data.store import read_header, read_rows
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.summary import summarize
from flipscope.organism import OrganismConfig, load_organism
from flipscope.organism.questions import export_questions


@pytest.fixture(scope="module")
def organism_questions(tmp_path_factory: pytest.TempPathFactory):
    vlm, _, card = load_organism()
    cfg = OrganismConfig.from_dict(card["config"])
    path = export_questions(cfg, tmp_path_factory.mktemp("organism-questions"), n_films=30)
    return vlm, card, load_questions(path)


def test_evaluation_finds_the_planted_shortcut(organism_questions, tmp_path: Path) -> None:
    vlm, card, questions = organism_questions
    cfg = EvalConfig(conditions=("image", "blank", "swap"), batch_size=64)
    run_sweep(vlm, questions, cfg, tmp_path / "store.jsonl", progress=False)
    rows = read_rows(tmp_path / "store.jsonl")
    assert len(rows) == len(questions) * len(questions[0].prompts) * 3
    assert read_header(tmp_path / "store.jsonl")["eval_config"]["conditions"] == ["image", "blank", "swap"]
    summary = summarize(rows)
    by_strategy = summary["by_strategy"]
    shortcut = card["shortcut"]["family"]
    assert by_strategy[shortcut]["paraphrase_flip_rate"]["value"] > 0.3
    for family, block in by_strategy.items():
        if family != shortcut:
            assert block["paraphrase_flip_rate"]["value"] < 0.05, family
    overall = summary["overall"]
    assert 0.15 <= overall["flip_rate"]["value"] <= 0.6
    assert overall["flip_rate"]["low"] < overall["flip_rate"]["value"] < overall["flip_rate"]["high"]
    assert overall["accuracy"]["value"] > 0.95
    assert summary["by_quadrant"]["Dangerous"]["share"]["value"] >= 0.1
    assert overall["swap_sensitivity"]["value"] > 0.2


def test_generated_answers_are_parsed_and_summarized(organism_questions, tmp_path: Path) -> None:
    vlm, _, questions = organism_questions
    cfg = EvalConfig(conditions=("image", "blank"), batch_size=64, generate_tokens=1)
    run_sweep(vlm, questions[:12], cfg, tmp_path / "gen.jsonl", progress=False)
    rows = read_rows(tmp_path / "gen.jsonl")
    assert all(r["generated"].strip() in ("yes", "no") for r in rows)
    # One generated token is the argmax over the vocabulary, so it agrees with the margin's sign
    # wherever yes or no is that argmax.
    assert all(r["parsed"] == r["answer"] for r in rows)
    same = json.dumps(summarize(rows, source="generated"), sort_keys=True) == json.dumps(
        summarize(rows), sort_keys=True
    )
    assert same  # compared as JSON: estimates over no units are NaN
    edited = [
        dict(r, parsed=None) if (r["question_id"] == questions[0].id and r["prompt_index"] == 0) else r for r in rows
    ]
    assert summarize(edited, source="generated")["overall"]["n_questions"] == 11
