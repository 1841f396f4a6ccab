"""The command line: bad input is one line, exit 2, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.organism import default_organism_dir
from flipscope.reporting.format import fmt

runner = CliRunner()


def test_bad_questions_write_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": "q1", "image": "missing.png", "answer": "maybe"}) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["evaluate", "--model", str(default_organism_dir()), "--questions", str(bad), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert f"{bad}:1: field 'answer': expected 'yes' or 'no'" in result.output
    assert "missing.png' does not exist" in result.output
    assert not out.exists()


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    args = ["evaluate", "--model", str(default_organism_dir()), "--questions", str(tmp_path / "q.jsonl")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--conditions", "image,gray"])
    assert result.exit_code == 2 and "conditions ['gray'] are unknown" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--shard", "2/2"])
    assert result.exit_code == 2 and "expected 0 <= K < N" in result.output
    result = runner.invoke(
        app, ["evaluate", "--model", "/no/model", "--questions", "q", "--out", "o", "--dtype", "fp8"]
    )
    assert result.exit_code == 2 and "'fp8' is not one of" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--answers", "generated"])
    assert result.exit_code == 2 and "needs --generate-tokens > 0" in result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o"), "--reliance", "swap"])
    assert result.exit_code == 2 and "--reliance 'swap' is not among the evaluated conditions" in result.output
    assert not (tmp_path / "o").exists()


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--questions", "--images", "--conditions", "--blank", "--out", "--shard"):
        assert option in result.output


def test_the_command_answers_every_wrong_path_or_option_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import pytest

    from flipscope.cli import main

    bank = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
    cases = {
        ("hooks", str(tmp_path)): "has no config.json",
        ("merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m")): "does not exist",
        ("discover", "--flipbank", str(tmp_path / "nope.json")): "cannot read FlipBank",
        ("patch", "--flipbank", str(bank)): "Missing option '--features'",
        ("patch", "--flipbank", str(bank), "--features", "38", "--positions", "middle"): "positions 'middle'",
        ("clamp", "--questions", str(tmp_path / "q.jsonl"), "--features", "38", "--out", str(tmp_path)): "does not",
        ("demo", "--organism", str(tmp_path), "--out", str(tmp_path / "f")): "holds no organism",
        ("organism", "flipbank", "--organism", str(tmp_path), "--out", str(tmp_path / "b")): "holds no organism",
        ("evaluate", "--nope"): "No such option",
        ("organism", "build", "--config", "nope", "--out", str(tmp_path / "o")): "expected a preset (default",
    }
    for args, message in cases.items():
        monkeypatch.setattr("sys.argv", ["flipscope", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert exited.value.code == 2, (args, captured)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, captured.err)
        assert "Traceback" not in captured.out + captured.err
    assert not any((tmp_path / name).exists() for name in ("f", "b", "m", "o"))


def test_the_quadrant_table_keeps_its_columns_apart_when_a_cell_notes_few_cases(tmp_path: Path) -> None:
    source = Path(__file__).parents[1] / "flipbank" / "organism" / "questions.jsonl"
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(source.read_text().splitlines()[:8]) + "\n")
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(default_organism_dir()), "--questions", str(questions)]
    result = runner.invoke(app, [*args, "--images", str(source.parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("quadrant"))
    column = lines[header].index("accuracy")
    rows = lines[header + 1 : header + 5]
    assert any("(from only" in row for row in rows)  # the cells that outgrow a fixed width
    blocks = json.loads((out / "summary.json").read_text())["by_quadrant"]
    for row, (name, block) in zip(rows, blocks.items(), strict=True):
        assert row.startswith(name) and row[column - 1] == " "
        assert row[column:].startswith(fmt(block["accuracy"]))
