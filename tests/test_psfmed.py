"""PSF-Med in both of its authors' layouts, written here in each format: the same questions come
back from nested JSON, pair-row CSV, Parquet and JSONL; the yes/no flags filter; answer-inverting
paraphrases keep their relation through conversion, evaluation rows, flips and curation; bad records
are named file:line and field; missing images are listed before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from csvfiles import write_csv
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.curation import CurationRules, curate
from flipscope.data.psfmed import psfmed_rows, read_records, resolve_images, write_questions
from flipscope.data.questions import Question, load_questions
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import questions_fingerprint, unit_prompts
from flipscope.experiments.summary import question_table

NESTED = [
    {"question_id": 7, "original_question": "Is there a pleural effusion?", "answer": "Yes",
     "question_type": "presence", "filename": "a1.jpg", "is_yesno": True, "is_yesno_claude": True,
     "paraphrases": [
         {"text": "Do you see a pleural effusion?", "phenomenon": "lexical_substitution", "is_yesno": True,
          "is_yesno_claude": True},
         {"text": "Describe any effusion.", "phenomenon": "syntactic_restructuring", "is_yesno": False,
          "is_yesno_claude": False},
         {"text": "Is a pleural effusion present?", "phenomenon": "syntactic_restructuring", "is_yesno": True,
          "is_yesno_claude": False},
     ]},
    {"question_id": "q8", "original_question": "Is the heart enlarged?", "answer": "no",
     "question_type": "presence", "filename": "b2.jpg",
     "paraphrases": [{"text": "Is there cardiomegaly?", "phenomenon": "lexical_substitution"}]},
]  # fmt: skip
PAIRS = [
    {"question_id": "p1", "image_path": "c3.png", "original_question": "Is there a nodule?",
     "paraphrase": "Can a nodule be seen?", "phenomenon": "lexical_substitution", "ground_truth": "yes",
     "op_match": "True"},
    {"question_id": "p1", "image_path": "c3.png", "original_question": "Is there a nodule?",
     "paraphrase": "Is there no nodule?", "phenomenon": "negation_pattern", "ground_truth": "yes",
     "op_match": "False"},
    {"question_id": "p2", "image_path": "d4.png", "original_question": "Is there an effusion?",
     "paraphrase": "Any effusion present?", "phenomenon": "scope_quantification", "ground_truth": "no",
     "op_match": "True"},
]  # fmt: skip


def test_the_nested_layout_reads_from_a_list_a_results_object_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(NESTED))
    (tmp_path / "results.json").write_text(json.dumps({"results": NESTED}))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in NESTED))
    read = [psfmed_rows(read_records(tmp_path / name)) for name in ("list.json", "results.json", "lines.jsonl")]
    strip = [[{k: v for k, v in r.items() if k != "source"} for r in rows] for rows in read]
    assert strip[0] == strip[1] == strip[2]
    first = read[0][0]
    assert first["id"] == "7" and first["answer"] == "yes" and first["finding"] == "presence"
    assert first["strategies"] == ["lexical_substitution", "syntactic_restructuring", "syntactic_restructuring"]
    assert first["relations"] == ["same"] * 3 and first["source"].endswith("list.json:record 0")


def test_the_yes_no_flags_filter_questions_and_paraphrases(tmp_path: Path) -> None:
    (tmp_path / "n.json").write_text(json.dumps(NESTED))
    kept = {
        mode: [len(r["paraphrases"]) for r in psfmed_rows(read_records(tmp_path / "n.json"), yesno=mode)]
        for mode in ("off", "regex", "claude", "both", "either", "any")
    }
    # question 8 has no flags: kept in every mode
    assert kept == {"off": [3, 1], "regex": [2, 1], "claude": [1, 1], "both": [1, 1], "either": [2, 1], "any": [2, 1]}
    with pytest.raises(FlipscopeError, match="yes/no filter 'sometimes' is unknown"):
        psfmed_rows(read_records(tmp_path / "n.json"), yesno="sometimes")


def test_pair_rows_from_csv_and_parquet_keep_the_inverted_relation(tmp_path: Path) -> None:
    from_csv = psfmed_rows(read_records(write_csv(tmp_path / "bank.csv", PAIRS)))
    frame = pd.DataFrame(PAIRS).assign(op_match=[True, False, True])
    frame.to_parquet(tmp_path / "bank.parquet")
    from_parquet = psfmed_rows(read_records(tmp_path / "bank.parquet"))
    strip = [[{k: v for k, v in r.items() if k != "source"} for r in rows] for rows in (from_csv, from_parquet)]
    assert strip[0] == strip[1]
    nodule = from_csv[0]
    assert nodule["paraphrases"] == ["Can a nodule be seen?", "Is there no nodule?"]
    assert nodule["relations"] == ["same", "inverted"] and nodule["strategies"][1] == "negation_pattern"
    assert nodule["source"].endswith("bank.csv:2")  # the header is line 1


def test_every_bad_record_is_named_by_file_line_and_field(tmp_path: Path) -> None:
    bad = [dict(PAIRS[0]), dict(PAIRS[1], ground_truth="maybe"), dict(PAIRS[2], op_match="sometimes")]
    bad.append(dict(PAIRS[0], paraphrase="Another?", original_question="Is there a mass?"))
    with pytest.raises(FlipscopeError) as err:
        psfmed_rows(read_records(write_csv(tmp_path / "bad.csv", bad)))
    text = str(err.value)
    assert text.startswith("3 problems in the PSF-Med records")
    assert "bad.csv:3: field 'ground_truth': expected yes or no (any case), got 'maybe'" in text
    assert "bad.csv:4: field 'op_match': expected true or false, got 'sometimes'" in text
    assert "bad.csv:5: question 'p1' differs from its first row" in text
    (tmp_path / "broken.jsonl").write_text(json.dumps(NESTED[0]) + "\n{not json\n")
    with pytest.raises(FlipscopeError, match=r"broken.jsonl:2: expected a record \(an object\), got not valid JSON"):
        psfmed_rows(read_records(tmp_path / "broken.jsonl"))


def test_images_resolve_by_name_or_the_mimic_layout_and_every_missing_one_is_listed(tmp_path: Path) -> None:
    nested = [dict(NESTED[0], subject_id="10045321", study_id="s51234567", filename="a1"), NESTED[1]]
    (tmp_path / "n.json").write_text(json.dumps(nested))
    rows = psfmed_rows(read_records(tmp_path / "n.json"))
    mimic = tmp_path / "files" / "p10" / "p10045321" / "s51234567" / "a1.jpg"
    mimic.parent.mkdir(parents=True)
    mimic.write_bytes(b"jpg")
    with pytest.raises(FlipscopeError, match=r"n.json:record 1: image 'b2.jpg' not found"):
        resolve_images(rows, tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b2.jpg").write_bytes(b"jpg")
    resolved = resolve_images(rows, tmp_path)
    assert [r["image"] for r in resolved] == [str(mimic), str(tmp_path / "images" / "b2.jpg")]


def test_a_datasets_table_and_its_saved_folder_read_as_the_csv(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([dict(r, op_match=r["op_match"] == "True") for r in PAIRS])
    table.save_to_disk(str(tmp_path / "saved"))
    expected = psfmed_rows(read_records(write_csv(tmp_path / "bank.csv", PAIRS)))
    for source in (table, tmp_path / "saved"):
        rows = psfmed_rows(read_records(source))
        assert [{k: v for k, v in r.items() if k != "source"} for r in rows] == [
            {k: v for k, v in r.items() if k != "source"} for r in expected
        ]
    assert rows[0]["source"] == "Dataset:row 0"


def _films(root: Path, names: list[str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8)).save(root / name)


def test_convert_writes_questions_the_loader_reads_with_relations_and_families(tmp_path: Path) -> None:
    _films(tmp_path / "imgs", ["c3.png", "d4.png"])
    source = write_csv(tmp_path / "bank.csv", PAIRS)
    out = tmp_path / "data" / "questions.jsonl"
    result = CliRunner().invoke(app, ["convert", str(source), "--out", str(out), "--images", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert "2 questions, 3 paraphrases (1 answer-inverting)" in result.output
    nodule, effusion = load_questions(out)
    assert nodule.relations == ("same", "inverted") and effusion.relations is None  # all-same: no relations
    assert nodule.strategies == ("lexical_substitution", "negation_pattern")
    assert [nodule.truth(k) for k in range(3)] == [True, True, False]
    plain = dataclasses.replace(nodule, relations=None)
    assert questions_fingerprint([nodule]) != questions_fingerprint([plain])  # a relation is part of the questions


def test_convert_writes_nothing_when_an_image_is_missing(tmp_path: Path) -> None:
    _films(tmp_path, ["c3.png"])
    out = tmp_path / "questions.jsonl"
    result = CliRunner().invoke(
        app, ["convert", str(write_csv(tmp_path / "b.csv", PAIRS)), "--out", str(out), "--images", str(tmp_path)]
    )
    assert result.exit_code == 2 and "b.csv:4: image 'd4.png' not found" in result.output and not out.exists()
    bad = write_csv(tmp_path / "bad.csv", [PAIRS[0], dict(PAIRS[1], ground_truth="unsure")])
    result = CliRunner().invoke(app, ["convert", str(bad), "--out", str(out), "--images", str(tmp_path)])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip().splitlines() == [
        f"error: the PSF-Med records: {bad}:3: field 'ground_truth': expected yes or no (any case), got 'unsure'"
    ]


def _answered(questions: list[Question], answer) -> list[dict]:
    """Evaluation rows of `questions` (with the image) as `unit_prompts` makes them, answered by `answer(q, k)`."""
    _, rows = unit_prompts(questions, "image", {})
    for row in rows:
        q = next(q for q in questions if q.id == row["question_id"])
        yes = answer(q, row["prompt_index"])
        row.update(answer="yes" if yes else "no", margin=2.0 if yes else -2.0, entropy=0.1, p_yes=0.9 if yes else 0.1)
    return rows


def test_an_inverted_paraphrase_flips_only_when_it_keeps_the_original_answer(tmp_path: Path) -> None:
    """A model that answers every op_match = False paraphrase with the opposite of its original answer
    has no flips there, is correct on it by the paraphrase's own truth, and curation leaves those
    paraphrases out of the bank (its cases are read in the original's frame) and counts them."""
    _films(tmp_path, ["c3.png", "d4.png"])
    rows = resolve_images(psfmed_rows(read_records(write_csv(tmp_path / "b.csv", PAIRS))), tmp_path)
    write_questions(rows, tmp_path / "q.jsonl")
    questions = load_questions(tmp_path / "q.jsonl")
    consistent = _answered(questions, lambda q, k: q.truth(k))  # the opposite answer on the inverted one
    inverted = [r for r in consistent if r.get("relation") == "inverted"]
    assert len(inverted) == 1 and inverted[0]["truth"] == "no" and inverted[0]["answer"] == "no"
    table = question_table(consistent)
    assert not any(e["flip"] for e in table.values()) and all(e["correct"] for e in table.values())
    stubborn = question_table(_answered(questions, lambda q, k: q.answer))  # the same answer everywhere
    assert stubborn["p1"]["flip"] and stubborn["p1"]["paraphrase_flips"] == {1: False, 2: True}
    assert not stubborn["p2"]["flip"]
    bank = curate(_answered(questions, lambda q, k: q.answer), questions, CurationRules(), source={})
    assert bank["n_flips"] == 0 and bank["inverted"] == {"n": 1, "n_broken": 1}


def test_the_same_questions_in_both_layouts_read_the_same(tmp_path: Path) -> None:
    pairs = [
        {"question_id": q["question_id"], "image_path": q["filename"], "original_question": q["original_question"],
         "paraphrase": p["text"], "phenomenon": p["phenomenon"], "ground_truth": q["answer"], "op_match": True,
         "question_type": q["question_type"]}
        for q in NESTED for p in q["paraphrases"]
    ]  # fmt: skip
    (tmp_path / "nested.json").write_text(json.dumps(NESTED))
    fields = ("id", "image", "finding", "answer", "question", "paraphrases", "strategies", "relations")
    nested = [{k: r[k] for k in fields} for r in psfmed_rows(read_records(tmp_path / "nested.json"))]
    paired = [{k: r[k] for k in fields} for r in psfmed_rows(read_records(write_csv(tmp_path / "pairs.csv", pairs)))]
    assert nested == paired and len(nested) == 2
