# ruff: noqa: E501
"""Answer tables from models nobody can hook: the lab's layout and mapped layouts import into stores
that summarize and compare like any run; a group-level "answers changed" count equals flipscope's
flip count; answer-inverting paraphrases flip only when they break their relation; a hooked run's
own answers, exported as a table and imported, compare identical to it; bad rows are named and
nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from csvfiles import write_csv
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.answer_tables import read_answer_table
from flipscope.data.imported import import_answers
from flipscope.data.store import iter_rows, read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.compare import compare_runs
from flipscope.experiments.summary import question_table, summarize

STRATEGIES = ("formal register", "hedged", "negated lead", "clinical shorthand")


def _lab_table(flip_every: int, yes_bias: bool = False) -> list[dict]:
    """The lab's layout: 12 (study, baseline question) groups × 4 wordings; a group's answers change
    on every `flip_every`-th group (its variant 3 answers the other way)."""
    rows = []
    for g in range(12):
        study, baseline = f"s{5000 + g // 2}", ("Is there a pleural effusion?", "Is the heart enlarged?")[g % 2]
        truth = "yes" if g % 3 else "no"
        answer = truth if (g % 4 or not yes_bias) else "yes"
        for v in range(4):
            wording = baseline if v == 0 else f"{STRATEGIES[v - 1]}: {baseline.lower()}"
            given = ({"yes": "no", "no": "yes"}[answer]) if (v == 3 and g % flip_every == 0) else answer
            rows.append({"study_id": study, "baseline_question": baseline, "ground_truth": truth, "variant_index": v,
                         "strategy": "original" if v == 0 else STRATEGIES[v - 1], "question": wording,
                         "generated_text": f"{given.capitalize()}, on this film.", "extracted_answer": given})  # fmt: skip
    return rows


def _answers_changed(rows: list[dict], answer: str = "extracted_answer") -> int:
    """The lab's own count: (study, baseline question) groups whose answers are not all the same."""
    groups: dict[tuple, set] = {}
    for r in rows:
        groups.setdefault((r["study_id"], r["baseline_question"]), set()).add(r[answer].lower())
    return sum(len(answers) > 1 for answers in groups.values())


def test_the_labs_layout_imports_and_its_answers_changed_count_is_the_flip_count(tmp_path: Path) -> None:
    rows = _lab_table(flip_every=3)
    store = import_answers(write_csv(tmp_path / "gpt.csv", rows), tmp_path / "gpt", model="gpt-5-mini")["gpt-5-mini"]
    table = question_table(iter_rows(store))
    assert len(table) == 12
    assert sum(e["flip"] for e in table.values()) == _answers_changed(rows) == 4
    header = read_header(store)
    assert header["model"] == {"name": "gpt-5-mini", "imported": True}
    assert header["imported"]["columns"]["question_id"] == "study_id+baseline_question"
    summary = summarize(iter_rows(store))
    assert summary["overall"]["accuracy"]["value"] == 1.0
    assert summary["by_strategy"]["negated lead"]["paraphrase_flip_rate"]["value"] == pytest.approx(4 / 12)
    assert summary["by_strategy"]["hedged"]["paraphrase_flip_rate"]["value"] == 0.0  # variant 2
    assert all(block["n_questions"] == 0 for block in summary["by_quadrant"].values())  # no image removed
    result = CliRunner().invoke(app, ["summarize", str(tmp_path / "gpt")])
    assert result.exit_code == 0, result.output
    assert "quadrants: unavailable (no image-removed condition" in result.output
    assert "nan" not in result.output.lower()
    assert json.loads((tmp_path / "gpt" / "summary.json").read_text())["overall"]["n_questions"] == 12


def test_generated_text_is_parsed_hedges_drop_out_and_repeated_wordings_are_counted(tmp_path: Path) -> None:
    rows = _lab_table(flip_every=100)  # only group 0 changes its answer
    for r in rows:
        r.pop("extracted_answer")
    rows[1]["generated_text"] = "I cannot tell from this film."  # no keyword of either kind: excluded
    repeat = dict(rows[7], variant_index=4)  # group 1's variant 3 asked twice, answered the same
    store = import_answers(write_csv(tmp_path / "t.csv", [*rows, repeat]), tmp_path / "t", model="m")["m"]
    header = read_header(store)
    assert header["imported"]["deduplicated"] == 1
    assert sum(header["imported"]["excluded"].values()) == 1
    stored = read_rows(store)
    assert [r["count"] for r in stored if r["question_id"].startswith("s5000 | Is the heart")][-1] == 2
    assert len(stored) == 12 * 4 - 1
    table = question_table(stored)
    assert sum(e["flip"] for e in table.values()) == 1


def test_a_repeated_wording_answered_both_ways_stays_a_flip(tmp_path: Path) -> None:
    rows = _lab_table(flip_every=100)[4:8]  # group 1: no change
    other = {"yes": "no", "no": "yes"}[rows[3]["extracted_answer"]]
    rows.append(dict(rows[3], variant_index=4, extracted_answer=other))
    store = import_answers(write_csv(tmp_path / "t.csv", rows), tmp_path / "t", model="m")["m"]
    assert read_header(store)["imported"]["repeats_disagree"] == 1
    assert sum(e["flip"] for e in question_table(iter_rows(store)).values()) == _answers_changed(rows) == 1


def test_two_models_import_from_one_table_and_compare(tmp_path: Path) -> None:
    a, b = _lab_table(flip_every=3), _lab_table(flip_every=2, yes_bias=True)
    table = pd.DataFrame([{**r, "model": "claude-haiku"} for r in a] + [{**r, "model": "gpt-5-mini"} for r in b])
    table.to_parquet(tmp_path / "both.parquet")
    written = import_answers(tmp_path / "both.parquet", tmp_path / "runs")
    assert set(written) == {"claude-haiku", "gpt-5-mini"}
    assert written["gpt-5-mini"] == tmp_path / "runs" / "gpt-5-mini" / "results.jsonl"
    found = compare_runs(list(written.values()), names=list(written)).to_dict()
    haiku, gpt = found["runs"]["claude-haiku"], found["runs"]["gpt-5-mini"]
    assert haiku["flip_rate"]["value"] == pytest.approx(4 / 12) and gpt["flip_rate"]["value"] == pytest.approx(6 / 12)
    assert haiku["yes_rate"]["value"] == pytest.approx(8 / 12) and gpt["yes_rate"]["value"] == pytest.approx(9 / 12)
    assert gpt["accuracy"]["value"] == pytest.approx(11 / 12)
    assert not haiku["quadrants_available"] and "screening" not in haiku
    (test,) = found["paired"]
    assert (test["flips"]["only_first"], test["flips"]["only_second"]) == (2, 4)  # groups 3, 9 vs 2, 4, 8, 10
    assert (test["correct"]["only_first"], test["correct"]["only_second"]) == (1, 0)
    assert found["correlation"]["n_runs"] == 0
    assert gpt["by_strategy"]["negated lead"]["value"] == pytest.approx(6 / 12)
    separate = [  # the same answers as two tables, one per model, compare the same
        import_answers(write_csv(tmp_path / f"{name}.csv", rows), tmp_path / name, model=name)[name]
        for name, rows in (("claude-haiku", a), ("gpt-5-mini", b))
    ]
    again = compare_runs(separate, names=list(written)).to_dict()
    assert json.dumps(again["runs"]) == json.dumps(found["runs"]) and again["paired"] == found["paired"]


def test_inverted_paraphrases_flip_only_when_they_keep_the_answer(tmp_path: Path) -> None:
    """PSF-Med's op_match = False: a model that answers every inverted paraphrase with the opposite of
    its original answer has no flips there; one that repeats its answer flips on each."""
    rows = []
    for q in range(10):
        truth = "yes" if q % 2 else "no"
        rows.append({"question_id": f"q{q}", "variant": 0, "question": "Is there an effusion?", "ground_truth": truth,
                     "op_match": True, "phenomenon": "original", "opposite": truth, "same": truth})  # fmt: skip
        for v, (text, op) in enumerate((("Any effusion?", True), ("Are the costophrenic angles clear?", False)), 1):
            inverted = {"yes": "no", "no": "yes"}[truth]
            rows.append({"question_id": f"q{q}", "variant": v, "question": text, "ground_truth": truth, "op_match": op,
                         "phenomenon": "negation_pattern" if not op else "lexical_substitution",
                         "opposite": truth if op else inverted, "same": truth})  # fmt: skip
    path = write_csv(tmp_path / "inv.csv", rows)
    columns = {"wording": "question", "truth": "ground_truth", "relation": "op_match", "strategy": "phenomenon"}
    right = import_answers(path, tmp_path / "right", columns | {"answer": "opposite"}, model="m")["m"]
    wrong = import_answers(path, tmp_path / "wrong", columns | {"answer": "same"}, model="m")["m"]
    right_summary, wrong_summary = summarize(iter_rows(right)), summarize(iter_rows(wrong))
    assert right_summary["overall"]["flip_rate"]["value"] == 0.0
    assert right_summary["by_strategy"]["negation_pattern"]["paraphrase_flip_rate"]["value"] == 0.0
    assert wrong_summary["by_strategy"]["negation_pattern"]["paraphrase_flip_rate"]["value"] == 1.0
    assert wrong_summary["by_strategy"]["lexical_substitution"]["paraphrase_flip_rate"]["value"] == 0.0
    inverted = [r for r in read_rows(right) if r.get("relation") == "inverted"]
    assert len(inverted) == 10
    assert all(r["answer"] == r["truth"] for r in inverted)  # the paraphrase's own truth is the opposite one
    assert right_summary["overall"]["accuracy"]["value"] == 1.0


def test_a_malformed_row_is_named_by_line_and_field_and_nothing_is_written(tmp_path: Path) -> None:
    rows = _lab_table(flip_every=3)
    rows[5]["variant_index"] = "second"
    rows[9]["ground_truth"] = "maybe"
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(FlipscopeError) as err:
        import_answers(path, tmp_path / "out", model="m")
    message = str(err.value)
    assert f"{path}:7: field 'variant' (column 'variant_index')" in message
    assert f"{path}:11: field 'truth' (column 'ground_truth')" in message
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["import-answers", str(path), "--out", str(tmp_path / "cli"), "--model", "m"])
    assert result.exit_code == 2 and "bad.csv:7" in result.output and not (tmp_path / "cli" / "results.jsonl").exists()


def test_a_table_without_the_needed_columns_says_what_to_map(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Is there?", "reply": "yes"}) + "\n")
    with pytest.raises(FlipscopeError, match="--map FIELD=COLUMN"):
        read_answer_table(path, model="m")
    mapping = {"question_id": "id", "wording": "prompt", "original": "prompt", "answer": "reply"}
    with pytest.raises(FlipscopeError, match="no truth for question 'a'"):
        import_answers(path, tmp_path / "o", mapping, model="m")
    with pytest.raises(FlipscopeError, match="no column 'verdict'"):
        read_answer_table(path, mapping | {"answer": "verdict"}, model="m")
    with pytest.raises(FlipscopeError, match="unknown fields"):
        read_answer_table(path, mapping | {"score": "reply"}, model="m")


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory: pytest.TempPathFactory):
    """A hooked evaluation of the shipped organism (image and blank), and its questions."""
    from flipscope.data.questions import load_questions
    from flipscope.experiments.evaluation import EvalConfig, run_sweep
    from flipscope.organism import OrganismConfig, load_organism
    from flipscope.organism.questions import export_questions

    vlm, _, card = load_organism()
    root = tmp_path_factory.mktemp("hooked")
    questions = load_questions(export_questions(OrganismConfig.from_dict(card["config"]), root, n_films=8))
    run_sweep(vlm, questions, EvalConfig(batch_size=64), root / "hooked" / "results.jsonl", progress=False)
    return root / "hooked", questions


def test_a_hooked_runs_answers_imported_as_a_table_compare_identical_to_it(organism_run, tmp_path: Path) -> None:
    hooked, questions = organism_run
    wordings = {q.id: q.prompts for q in questions}
    table = [{"qid": r["question_id"], "k": r["prompt_index"], "text": wordings[r["question_id"]][r["prompt_index"]],
              "logit_gap": r["margin"], "image": {"image": "with_image", "blank": "blank_image"}[r["condition"]],
              "gt": r["truth"], "family": r["strategy"] or "", "finding": r["finding"]}
             for r in read_rows(hooked / "results.jsonl")]  # fmt: skip
    path = write_csv(tmp_path / "api.csv", table)
    mapping = ["question_id=qid", "variant=k", "wording=text", "margin=logit_gap", "condition=image", "truth=gt",
               "strategy=family"]  # fmt: skip
    options = [part for m in mapping for part in ("--map", m)]
    result = CliRunner().invoke(
        app, ["import-answers", str(path), "--out", str(tmp_path / "api"), "--model", "api", *options]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "api" / "summary.json").is_file()
    found = compare_runs([hooked, tmp_path / "api"], names=["hooked", "imported"]).to_dict()
    a, b = found["runs"]["hooked"], found["runs"]["imported"]
    assert a["flip_rate"]["value"] > 0.1  # the organism flips: the comparison has something to agree on
    for key in ("flip_rate", "accuracy", "yes_rate", "text_only_agreement", "pairwise_disagreement"):
        assert a[key] == b[key], key
    assert a["by_strategy"] == b["by_strategy"]
    for q, block in a["quadrants"].items():  # entropy is recomputed from the margin in float64: equal to ~1e-8
        assert block["share"] == b["quadrants"][q]["share"] and block["accuracy"] == b["quadrants"][q]["accuracy"]
        assert block["mean_entropy_bits"]["value"] == pytest.approx(b["quadrants"][q]["mean_entropy_bits"]["value"])
    assert a["screening"]["uncertainty_auroc"] == b["screening"]["uncertainty_auroc"]
    (test,) = found["paired"]
    assert test["flips"]["only_first"] == test["flips"]["only_second"] == 0 and test["n_shared"] == len(questions)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(hooked), str(tmp_path / "api"), "--out", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    assert "no difference in flipping can be claimed" in result.output
    assert "yes-rate" in (out / "compare.html").read_text()


def test_p_yes_is_read_as_its_log_odds_and_an_impossible_one_is_named(tmp_path: Path) -> None:
    import math

    rows = [{"study_id": r["study_id"], "baseline_question": r["baseline_question"], "ground_truth": r["ground_truth"],
             "variant_index": r["variant_index"], "question": r["question"],
             "p_yes": 0.8 if r["extracted_answer"] == "yes" else 0.1} for r in _lab_table(flip_every=3)]  # fmt: skip
    rows[0]["p_yes"], rows[4]["p_yes"] = 1.0, 0.0  # certain answers: finite log-odds, not ±inf
    store = import_answers(write_csv(tmp_path / "p.csv", rows), tmp_path / "p", model="m")["m"]
    margins = sorted(r["margin"] for r in read_rows(store))
    assert margins[0] == pytest.approx(math.log(1e-7 / (1 - 1e-7))) and margins[-1] == pytest.approx(-margins[0])
    assert {round(m, 6) for m in margins[1:-1]} == {round(math.log(4), 6), round(math.log(1 / 9), 6)}
    assert all((r["answer"] == "yes") == (r["margin"] > 0) for r in read_rows(store))
    table = _lab_table(flip_every=3)
    for r, p in zip(rows, [1.5, "high", float("nan")], strict=False):
        r["p_yes"] = p
    table[2]["margin"] = "inf"
    for r in table:
        r.setdefault("margin", 1.0 if r["extracted_answer"] == "yes" else -1.0)
    with pytest.raises(FlipscopeError) as err:
        import_answers(write_csv(tmp_path / "bad_p.csv", rows), tmp_path / "bad_p", model="m")
    for line in (2, 3, 4):
        assert f"bad_p.csv:{line}: field 'p_yes'" in str(err.value) and "a probability in [0, 1]" in str(err.value)
    with pytest.raises(FlipscopeError, match=r"bad_m.csv:4: field 'margin'.*a non-finite margin is no answer"):
        import_answers(write_csv(tmp_path / "bad_m.csv", table), tmp_path / "bad_m", model="m")
    assert not (tmp_path / "bad_p").exists() and not (tmp_path / "bad_m").exists()
