"""The command line: bad input is one line, exit 2, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.organism import default_organism_dir

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
