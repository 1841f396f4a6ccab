"""FlipBank curation is deterministic and records its rules; a corrupted bank lists every bad case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flipscope.data.curation import CurationRules, curate
from flipscope.data.flipbank import load_flipbank, save_flipbank
from flipscope.data.questions import load_questions
from flipscope.data.store import read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.model import HookedVLM
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("flipbank")
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    questions = load_questions(export_questions(cfg, root / "qs", n_films=10))
    vlm = HookedVLM.from_pretrained(default_organism_dir())
    store = run_sweep(vlm, questions, EvalConfig(conditions=("image",)), root / "eval.jsonl", progress=False)
    return root, questions, read_rows(store.path), read_header(store.path)


def test_curation_is_deterministic_and_records_its_rules(evaluated) -> None:
    root, questions, rows, header = evaluated
    rules = CurationRules(min_margin=0.0, controls_per_flip=1, seed=3, match="question")
    bank = curate(rows, questions, rules, source=header)
    assert bank == curate(rows, questions, rules, source=header)
    assert bank["rules"] == rules.to_dict() and bank["source"] == header
    assert bank["n_flips"] > 10 and bank["n_controls"] == bank["n_flips"]
    for case in bank["flips"]:
        assert case["original_answer"] != case["paraphrase_answer"]
        assert case["direction"] == f"{case['original_answer']}→{case['paraphrase_answer']}"
        assert case["strategy"] == "leading"  # the organism flips only under its planted framing
    assert all(c["original_answer"] == c["paraphrase_answer"] for c in bank["controls"])
    flipped = {c["question_id"] for c in bank["flips"]}
    assert {c["question_id"] for c in bank["controls"]} <= flipped
    strict = curate(rows, questions, CurationRules(min_margin=1.0), source=header)
    assert strict["n_flips"] < bank["n_flips"]
    assert all(min(abs(c["original_margin"]), abs(c["paraphrase_margin"])) >= 1.0 for c in strict["flips"])
    path = save_flipbank(bank, root / "qs" / "flipbank.json")
    assert json.loads(path.read_text())["flips"][0]["image"].startswith("images/")  # relative: the folder moves
    loaded = load_flipbank(path)
    assert loaded == json.loads(json.dumps(bank)) | {"flips": loaded["flips"], "controls": loaded["controls"]}
    for saved, case in zip(bank["flips"] + bank["controls"], loaded["flips"] + loaded["controls"], strict=True):
        assert Path(case["image"]).resolve() == Path(saved["image"]).resolve()
        assert {k: v for k, v in case.items() if k != "image"} == {k: v for k, v in saved.items() if k != "image"}


def test_corrupted_flipbank_lists_every_bad_case(evaluated, tmp_path: Path) -> None:
    root, questions, rows, header = evaluated
    bank = json.loads(json.dumps(curate(rows, questions, CurationRules(), source=header)))
    del bank["flips"][0]["paraphrase"]
    bank["flips"][1]["paraphrase_margin"] = "large"
    bank["controls"][0]["image"] = "images/nowhere.png"
    bank["controls"][1]["paraphrase_answer"] = "maybe"
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(bank))
    with pytest.raises(FlipscopeError) as info:
        load_flipbank(path, image_root=root / "qs")
    message = str(info.value)
    assert "flips[0]" in message and "field 'paraphrase': expected str, got None" in message
    assert "flips[1]" in message and "field 'paraphrase_margin': expected float, got 'large'" in message
    assert "controls[0]" in message and "nowhere.png' does not exist" in message
    assert "controls[1]" in message and "field 'paraphrase_answer': expected 'yes' or 'no', got 'maybe'" in message
    with pytest.raises(FlipscopeError, match="problem"):
        save_flipbank(bank, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


COMMITTED = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


def _without_margins(case: dict) -> dict:
    return {k: v for k, v in case.items() if not k.endswith("_margin")}


def test_committed_organism_flipbank_is_reproduced_and_valid(tmp_path: Path) -> None:
    from flipscope.organism.bank import build_flipbank

    committed = load_flipbank(COMMITTED)
    assert committed["n_flips"] >= 150 and committed["rules"]["match"] == "family"
    assert committed["n_controls"] + committed["control_shortfall"] == committed["n_flips"]
    assert committed["rules"]["min_margin"] > 0
    rebuilt = load_flipbank(build_flipbank(tmp_path / "bank", progress=False))
    assert {k: v for k, v in rebuilt.items() if k not in ("flips", "controls")} == {
        k: v for k, v in committed.items() if k not in ("flips", "controls")
    }
    for kind in ("flips", "controls"):
        mine, theirs = rebuilt[kind], committed[kind]
        assert [_without_margins(c) | {"image": Path(c["image"]).name} for c in mine] == [
            _without_margins(c) | {"image": Path(c["image"]).name} for c in theirs
        ]
        for a, b in zip(mine, theirs, strict=True):
            assert a["original_margin"] == pytest.approx(b["original_margin"], abs=1e-3)
            assert a["paraphrase_margin"] == pytest.approx(b["paraphrase_margin"], abs=1e-3)


def test_a_flipbank_from_another_model_is_refused(vlm: HookedVLM) -> None:
    from flipscope.data.flipbank import check_flipbank_model

    bank = load_flipbank(COMMITTED)
    with pytest.raises(FlipscopeError, match=r"made by another model: 'default' \(fingerprint .*\), not 'tiny-vlm'"):
        check_flipbank_model(bank, vlm)
    check_flipbank_model(bank, HookedVLM.from_pretrained(default_organism_dir()))


def test_a_loaded_bank_reads_through_typed_attributes() -> None:
    from flipscope.data.flipbank import FlipBank, FlipCase

    bank = load_flipbank(COMMITTED)
    assert isinstance(bank, FlipBank) and all(isinstance(c, FlipCase) for c in bank.cases)
    assert bank.n_flips == bank["n_flips"] == len(bank.flips) and bank.n_controls == len(bank.controls)
    assert [c.id for c in bank.cases] == [c["id"] for c in (*bank["flips"], *bank["controls"])]
    flip, control = bank.flips[0], bank.controls[0]
    assert flip.is_flip and not control.is_flip and control.direction is None
    assert flip.direction == f"{flip.original_answer}→{flip.paraphrase_answer}"
    assert flip.margin_shift == flip.paraphrase_margin - flip.original_margin
    assert Path(flip.image).is_file() and bank.source == bank["source"] and bank.format == "flipbank/1"
    assert json.loads(json.dumps(bank)) == bank  # still the file's JSON, value for value


def test_family_matched_controls_pair_each_flip_and_say_when_they_run_out(evaluated) -> None:
    root, questions, rows, header = evaluated
    bank = curate(rows, questions, CurationRules(match="family"), source=header)
    flips = {c["id"]: c for c in bank["flips"]}
    assert bank["rules"]["match"] == "family" and bank["n_controls"] + bank["control_shortfall"] == bank["n_flips"]
    assert bank["n_controls"] > 0
    for control in bank["controls"]:
        flip = flips[control["control_for"]]
        assert control["strategy"] == flip["strategy"] and control["finding"] == flip["finding"]
        assert control["original_answer"] == control["paraphrase_answer"]
    assert len({c["id"] for c in bank["controls"]}) == bank["n_controls"]  # each non-flip used once
    path = save_flipbank(bank, root / "qs" / "family.json")
    assert load_flipbank(path)["controls"][0]["control_for"] in flips
    greedy = curate(rows, questions, CurationRules(match="family", controls_per_flip=50), source=header)
    assert greedy["control_shortfall"] > 0 and greedy["n_controls"] < 50 * greedy["n_flips"]
    by_question = curate(rows, questions, CurationRules(match="question"), source=header)
    assert by_question["rules"]["match"] == "question" and "control_shortfall" not in by_question
    assert CurationRules().match == "family"
    with pytest.raises(FlipscopeError, match="control match 'finding' is unknown"):
        CurationRules(match="finding")


def test_curate_command_says_when_family_controls_run_out(evaluated) -> None:
    from typer.testing import CliRunner

    from flipscope.cli import app

    root, *_ = evaluated
    args = ["curate", "--results", str(root / "eval.jsonl"), "--questions", str(root / "qs" / "questions.jsonl")]
    result = CliRunner().invoke(
        app, [*args, "--match", "family", "--controls-per-flip", "50", "--out", str(root / "cli.json")]
    )
    assert result.exit_code == 0, result.output
    assert "flip(s) have no non-flip control of their own family and finding" in result.output
    result = CliRunner().invoke(app, [*args, "--match", "finding", "--out", str(root / "bad.json")])
    assert result.exit_code == 2 and "control match 'finding' is unknown" in result.output
    assert not (root / "bad.json").exists()
