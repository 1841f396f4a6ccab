# ruff: noqa: E501
"""Comparing runs: stores built with known quadrants give, number for number, what a hand count gives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flipscope.data.store import ResultStore
from flipscope.errors import FlipscopeError
from flipscope.experiments.compare import compare_runs, mcnemar
from flipscope.model.answers import binary_entropy

# A question: (flips?, image-reliant?, correct?, |margin| of the original with the image).
Spec = tuple[bool, bool, bool, float]


def _rows(qid: str, spec: Spec) -> list[dict]:
    flip, reliant, correct, size = spec
    answer = True  # the original, with the image, says yes
    truth = answer if correct else not answer
    answers = {("image", 0): answer, ("image", 1): answer, ("image", 2): (not answer) if flip else answer}
    for k in range(3):
        answers[("blank", k)] = (not answer) if reliant else answer
    rows = []
    for (condition, k), yes in answers.items():
        margin = (size if yes else -size) if (condition, k) == ("image", 0) else (2.0 if yes else -2.0)
        entropy = float(binary_entropy(__import__("torch").tensor([margin]))[0])
        rows.append({"question_id": qid, "finding": "effusion", "truth": "yes" if truth else "no",
                     "prompt_index": k, "kind": "original" if k == 0 else "paraphrase", "strategy": None,
                     "condition": condition, "margin": margin, "p_yes": 0.5, "entropy": entropy,
                     "answer": "yes" if yes else "no"})  # fmt: skip
    return rows


def _store(path: Path, specs: list[Spec], offset: int = 0) -> Path:
    path.mkdir(parents=True)
    with ResultStore.open(path / "results.jsonl", {"kind": "flip-evaluation", "run": path.name}) as store:
        for i, spec in enumerate(specs):
            store.append(f"q{i + offset}", _rows(f"q{i + offset:03d}", spec))
    return path


# Quadrants: Ideal = consistent & reliant, Fragile = flips & reliant, Dangerous = consistent & not
# reliant, Worst = flips & not reliant.
IDEAL, FRAGILE, DANGER, WORST = (False, True), (True, True), (False, False), (True, False)
RUNS = {
    # name: [(quadrant, correct, |margin|) ...]
    "base": [(IDEAL, True, 1.0)] * 4 + [(FRAGILE, True, 0.5)] * 3 + [(DANGER, True, 3.0)] * 2 + [(WORST, False, 0.2)],
    "lora": [(IDEAL, True, 1.0)] * 2 + [(FRAGILE, True, 0.5)] + [(DANGER, True, 4.0)] * 5 + [(DANGER, False, 0.1)] * 2,
    "clamp": [(IDEAL, True, 1.0)] * 5 + [(FRAGILE, False, 0.5)] * 2 + [(DANGER, True, 0.3)] * 3,
}


def _specs(run: list) -> list[Spec]:
    return [(q[0], q[1], correct, size) for q, correct, size in run]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [_store(root / name, _specs(run)) for name, run in RUNS.items()]


def _auroc_by_hand(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_every_number_matches_a_hand_count(runs: list[Path]) -> None:
    found = compare_runs(runs)
    assert found.names == ["base", "lora", "clamp"]
    by_hand = {
        "base": {"flip": 4 / 10, "Ideal": 4 / 10, "Fragile": 3 / 10, "Dangerous": 2 / 10, "Worst": 1 / 10, "acc": 9 / 10},
        "lora": {"flip": 1 / 10, "Ideal": 2 / 10, "Fragile": 1 / 10, "Dangerous": 7 / 10, "Worst": 0, "acc": 8 / 10},
        "clamp": {"flip": 2 / 10, "Ideal": 5 / 10, "Fragile": 2 / 10, "Dangerous": 3 / 10, "Worst": 0, "acc": 8 / 10},
    }  # fmt: skip
    for name, expected in by_hand.items():
        table = found.runs[name]
        assert table["flip_rate"]["value"] == pytest.approx(expected["flip"])
        assert table["accuracy"]["value"] == pytest.approx(expected["acc"])
        for q in ("Ideal", "Fragile", "Dangerous", "Worst"):
            assert table["quadrants"][q]["share"]["value"] == pytest.approx(expected[q]), (name, q)
        run = RUNS[name]
        dangerous = [q == DANGER for q, _, _ in run]
        accuracy_dangerous = [c for q, c, _ in run if q == DANGER]
        assert table["quadrants"]["Dangerous"]["accuracy"]["value"] == pytest.approx(np.mean(accuracy_dangerous))
        screen = table["screening"]
        assert screen["uncertainty_auroc"]["value"] == pytest.approx(_auroc_by_hand([-s for *_, s in run], dangerous))
        assert screen["text_only_sensitivity"]["value"] == 1.0  # a Dangerous answer survives the blank by definition
        not_reliant = [q in (DANGER, WORST) for q, _, _ in run]
        specificity = np.mean([not f for f, d in zip(not_reliant, dangerous, strict=True) if not d])
        assert screen["text_only_specificity"]["value"] == pytest.approx(specificity)
        top = sorted(run, key=lambda q: -q[2])[:5]  # the most confident half
        assert screen["dangerous_among_most_confident"]["0.5"]["value"] == pytest.approx(
            np.mean([q == DANGER for q, _, _ in top])
        )

    flip, danger = np.array([0.4, 0.1, 0.2]), np.array([0.2, 0.7, 0.3])
    fx, dx = flip - flip.mean(), danger - danger.mean()
    r = (fx * dx).sum() / math.sqrt((fx**2).sum() * (dx**2).sum())
    corr = found.correlation
    assert corr["pearson"]["value"] == pytest.approx(r)
    assert corr["spearman"]["value"] == pytest.approx(-1.0)  # ranks (3,1,2) against (1,3,2)
    assert corr["pearson"]["runs_ci"][0] <= r <= corr["pearson"]["runs_ci"][1]
    assert corr["note"] == "an estimate from 3 runs (fewer than 10)"

    base_lora = next(t for t in found.paired if (t["first"], t["second"]) == ("base", "lora"))
    base_flips = [q in (FRAGILE, WORST) for q, _, _ in RUNS["base"]]
    lora_flips = [q in (FRAGILE, WORST) for q, _, _ in RUNS["lora"]]
    only_base = sum(a and not b for a, b in zip(base_flips, lora_flips, strict=True))
    only_lora = sum(b and not a for a, b in zip(base_flips, lora_flips, strict=True))
    assert (base_lora["flips"]["only_first"], base_lora["flips"]["only_second"]) == (only_base, only_lora)
    assert base_lora["flips"]["p"] == pytest.approx(min(1.0, 2 * sum(math.comb(only_base + only_lora, k) for k in range(min(only_base, only_lora) + 1)) / 2 ** (only_base + only_lora)))  # fmt: skip


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs() -> None:
    a = np.array([True] * 6 + [False] * 4)
    b = np.array([False] * 5 + [True] * 5)
    test = mcnemar(a, b)
    assert (test["only_first"], test["only_second"]) == (5, 4)
    assert test["p"] == pytest.approx(1.0)
    assert mcnemar(np.ones(8, bool), np.zeros(8, bool))["p"] == pytest.approx(2 / 2**8)


def test_runs_on_different_questions_are_refused_unless_told(runs: list[Path], tmp_path: Path) -> None:
    other = _store(tmp_path / "site2", _specs(RUNS["base"])[:6], offset=5)  # q005..q010: 5 shared with the others
    with pytest.raises(
        FlipscopeError, match=r"evaluate different questions \(10 and 6, 5 shared\).*--questions shared"
    ):
        compare_runs([*runs, other])
    shared = compare_runs([*runs, other], questions="shared")
    assert shared.n_shared == 5 and all(t["n_questions"] == 5 for t in shared.runs.values())
    own = compare_runs([*runs, other], questions="own")
    assert own.runs["site2"]["n_questions"] == 6 and own.runs["base"]["n_questions"] == 10
    assert {t["n_shared"] for t in own.paired if "site2" in (t["first"], t["second"])} == {5}
    with pytest.raises(FlipscopeError, match="at least two runs"):
        compare_runs(runs[:1])
    with pytest.raises(FlipscopeError, match="must be unique"):
        compare_runs(runs[:2], names=["a", "a"])


def test_the_command_prints_the_comparison_and_writes_a_report_that_loads(runs: list[Path], tmp_path: Path) -> None:
    from browser import load_page
    from typer.testing import CliRunner

    from flipscope.cli import app
    from flipscope.reporting.files import png_renderer

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    assert "base: 10 questions; flip rate 0.400 [" in result.output
    assert "lora: 10 questions; flip rate 0.100 [" in result.output and "Dangerous 0.70" in result.output
    assert "No correlation between flip rate and the Dangerous share can be claimed: r = -0.87" in result.output
    assert "(from fewer than 10 runs); the paper measured r = -0.89 over 10 runs" in result.output
    assert (
        "base vs lora on 10 shared questions: no difference in flipping can be claimed (4 vs 1 discordant questions, "
        "McNemar p = 0.375)" in result.output
    )
    assert "Dangerous: 0/5 discordant (McNemar p 0.0625)." in result.output
    assert "nan" not in result.output.lower().replace("finance", "")
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"]["clamp"]["quadrants"]["Ideal"]["share"]["value"] == pytest.approx(0.5)
    for name in ("trap", "quadrant_shares", "quadrant_quality", "screening"):
        assert (out / f"{name}.html").is_file()
    if not png_renderer()[0]:
        pytest.skip("no Chromium here to load the report in")
    problems, plots = load_page(
        (out / "compare.html").resolve().as_uri(), "document.querySelectorAll('.main-svg').length"
    )
    assert problems == [] and plots >= 4


def test_compare_on_organism_runs(tmp_path: Path) -> None:
    """Three configurations of the organism (as shipped, its first framing feature clamped off and
    clamped up) on the same films: the command compares them end to end."""
    from typer.testing import CliRunner

    from flipscope.cli import app
    from flipscope.data.questions import load_questions
    from flipscope.experiments.evaluation import EvalConfig, run_sweep
    from flipscope.interventions.edited import ClampedVLM
    from flipscope.organism import OrganismConfig, load_organism
    from flipscope.organism.questions import export_questions

    vlm, sae, card = load_organism()
    questions = load_questions(export_questions(OrganismConfig.from_dict(card["config"]), tmp_path / "q", n_films=6))
    models = {
        "organism": vlm,
        "clamp38-0": ClampedVLM(vlm, sae, {38: 0.0}),
        "clamp38-8": ClampedVLM(vlm, sae, {38: 8.0}),
    }
    for name, model in models.items():
        run_sweep(model, questions, EvalConfig(), tmp_path / name / "results.jsonl", progress=False)
    result = CliRunner().invoke(
        app, ["compare", *(str(tmp_path / n) for n in models), "--out", str(tmp_path / "cmp"), "--no-png"]
    )
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert found["names"] == list(models) and found["n_shared_questions"] == 24
    assert found["runs"]["clamp38-0"]["flip_rate"]["value"] < found["runs"]["organism"]["flip_rate"]["value"]
    assert "organism vs clamp38-0 on 24 shared questions" in result.output
    assert (tmp_path / "cmp" / "compare.html").stat().st_size > 100_000  # plotly.js inlined: one self-contained page
