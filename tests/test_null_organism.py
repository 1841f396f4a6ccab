"""Honesty on a model with nothing planted: an organism trained with the shortcut off (a reduced
recipe, built here) flips only by noise, and flipscope must say that no framing mechanism was
found — in its card, in `discover` and in the demo's report — where correlation with the margin
shift alone would report a confident discovery."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.organism import OrganismConfig, build_organism

NULL = OrganismConfig(shortcut_p=0.0, vision_steps=80, steps=250, sae_prompts=1500, sae_steps=800, test_items=40)
FILMS = 80


@pytest.fixture(scope="module")
def null_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("null")
    card = build_organism(NULL, root / "organism", progress=False)
    args = ["demo", "--organism", str(root / "organism"), "--out", str(root / "figures"), "--films", str(FILMS)]
    result = CliRunner().invoke(app, [*args, "--no-png"])
    assert result.exit_code == 0, result.output
    return root, card, result.output


def test_the_card_marks_no_framing_feature(null_run) -> None:
    _, card, _ = null_run
    directions = card["directions"]
    assert card["shortcut"]["p"] == 0.0
    assert not directions["framing_significant"]
    assert directions["framing_norm"] <= max(directions["framing_null_norms"])
    assert not any(f["aligned"] for f in card["framing_features"])


def test_discover_finds_no_framing_where_correlation_would_claim_one(null_run) -> None:
    root, _, _ = null_run
    work = root / "figures" / "work"
    bank = root / "loose.json"
    curated = CliRunner().invoke(
        app,
        ["curate", "--results", str(work / "evaluation"), "--questions", str(work / "data" / "questions.jsonl"),
         "--min-margin", "0", "--out", str(bank)],
    )  # fmt: skip
    assert curated.exit_code == 0, curated.output
    out = root / "loose.features.json"
    run = CliRunner().invoke(
        app,
        ["discover", "--flipbank", str(bank), "--model", str(root / "organism"), "--exact-top", "0", "--out", str(out)],
    )
    assert run.exit_code == 0, run.output
    found = json.loads(out.read_text())
    assert found["framing"]["n_pairs"] >= 10  # enough pairs for the nulls to speak
    assert not found["framing"]["found"]
    assert found["framing"]["verdict"].startswith("No framing mechanism was found")
    assert "No framing mechanism was found" in run.output
    labels = {f["label"] for f in found["features"]}
    assert not labels & {"framing", "framing + readout"}
    # the trap the nulls guard against: by its parametric q-value, correlation "finds" features
    assert min(f["pearson_q"] for f in found["features"]) < 1e-3
    assert "answer readout" in labels  # what those features are


def test_the_demo_report_claims_no_mechanism(null_run) -> None:
    root, _, output = null_run
    page = (root / "figures" / "report.html").read_text()
    readings = " ".join(re.findall(r'<p class="reading">(.*?)</p>', page, flags=re.S))
    assert "No framing mechanism" in readings
    assert "carry the wording" not in readings and "carries the wording" not in readings
    assert "The flips concentrate" not in readings
    assert "with no planted shortcut" in page
    assert not re.search(r"\bnan\b", readings, flags=re.I)
    summary = json.loads((root / "figures" / "summary.json").read_text())
    n_flips = summary["flipbank"]["n_flips"]
    if n_flips < 10:  # every estimate over the flips says how few they are
        patch = readings[readings.index("Subtracting") :]
        assert patch.count(f"(from only {n_flips} case") >= 3
    assert summary["discovery"]["found"] is False and "No framing mechanism" in summary["discovery"]["verdict"]
