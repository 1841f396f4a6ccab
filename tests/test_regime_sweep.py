"""`flipscope organism sweep`: regimes × seeds trained into one folder per run (resumable), measured on
seen and withheld phrasings, compared across seeds with tests that claim a difference only when
the seeds separate the regimes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.errors import FlipscopeError
from flipscope.model.hooked import HookedVLM
from flipscope.organism import OrganismConfig
from flipscope.organism.sweep import RUN_FILE, run_dir, run_sweep
from flipscope.organism.sweep_stats import summarize_sweep
from flipscope.reporting.sweep_report import sweep_rows, sweep_sentences
from flipscope.stats import cliffs_delta

TINY = {"vision_steps": 10, "steps": 20, "batch_size": 8, "test_items": 4, "d_model": 32, "d_mlp": 64,
        "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "text_layers": 1, "vision_layers": 1, "vision_d_model": 32,
        "sae_layer": 0}  # fmt: skip


def test_a_tiny_sweep_of_two_regimes_and_two_seeds_runs_resumes_and_reports(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    args = ["organism", "sweep", "--out", str(tmp_path / "sweep"), "--config", str(config),
            "--regimes", "canonical,augmented", "--seeds", "2", "--withheld", "formal", "--no-png"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    runs = [run_dir(tmp_path / "sweep", r, s) for r in ("canonical", "augmented") for s in (0, 1)]
    stamps = [(folder / RUN_FILE).stat().st_mtime_ns for folder in runs]
    loaded = HookedVLM.from_pretrained(runs[0])  # each run is an ordinary checkpoint
    assert loaded.d_model == 32
    record = json.loads((runs[2] / RUN_FILE).read_text())
    assert record["regime"] == "augmented" and record["seed"] == 0
    assert record["config"]["withheld_families"] == ["formal"] and record["config"]["regime"] == "augmented"
    measures = record["measures"]
    assert measures["n_items"] == 4 * 4 and set(measures["flip_rate_by_family"]) == {"neutral", "leading", "formal"}
    for key in ("flip_rate_seen", "flip_rate_withheld", "accuracy", "text_only_agreement"):
        assert 0.0 <= measures[key] <= 1.0
    saved = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert set(saved["summary"]["regimes"]) == {"canonical", "augmented"}
    assert len(saved["summary"]["comparisons"]) == 2  # seen and withheld, one pair of regimes
    assert (tmp_path / "sweep" / "sweep.html").is_file()
    assert "canonical | 2 |" in first.output and "fewer than 10" in first.output and "nan" not in first.output

    os.remove(tmp_path / "sweep" / "summary.json")
    again = CliRunner().invoke(app, args)  # every run is reused, none retrained
    assert again.exit_code == 0, again.output
    assert [(folder / RUN_FILE).stat().st_mtime_ns for folder in runs] == stamps
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text()) == saved

    (runs[1] / RUN_FILE).unlink()  # a run that died before its record: trained again, to the same numbers
    run_sweep(
        OrganismConfig(**TINY, withheld_families=("formal",)), ["canonical"], [1], tmp_path / "sweep", progress=False
    )
    assert json.loads((runs[1] / RUN_FILE).read_text())["measures"] == saved["runs"][1]["measures"]

    other = OrganismConfig(**{**TINY, "steps": 21}, withheld_families=("formal",))
    with pytest.raises(FlipscopeError, match="written under another organism config"):
        run_sweep(other, ["canonical"], [0], tmp_path / "sweep", progress=False)
    bad_args = [
        "organism",
        "sweep",
        "--out",
        str(tmp_path / "bad"),
        "--config",
        str(config),
        "--regimes",
        "canonical,sideways",
    ]
    bad = CliRunner().invoke(app, bad_args)
    assert bad.exit_code == 2 and "regimes" in bad.output and "sideways" in bad.output


def _records(values: dict[str, list[tuple[float, float]]]) -> list[dict]:
    return [
        {
            "regime": regime,
            "seed": seed,
            "measures": {
                "flip_rate_seen": seen,
                "flip_rate_withheld": withheld,
                "accuracy": 0.8,
                "text_only_agreement": 0.5,
            },
        }  # fmt: skip
        for regime, pairs in values.items()
        for seed, (seen, withheld) in enumerate(pairs)
    ]


def test_the_sweep_claims_a_regime_difference_only_when_the_seeds_separate_the_regimes() -> None:
    rng = np.random.default_rng(0)
    separated = _records({
        "canonical": [(0.1 + 0.01 * i, 0.3 + 0.01 * i) for i in range(5)],
        "augmented": [(0.02 + 0.005 * i, 0.03 + 0.005 * i) for i in range(5)],
    })  # fmt: skip
    summary = summarize_sweep(separated)
    withheld = next(c for c in summary["comparisons"] if c["measure"] == "flip_rate_withheld")
    assert withheld["delta"] == 1.0 and withheld["p"] < 0.01 and withheld["q"] < 0.05
    said = " ".join(sweep_sentences(summary))
    assert "Trained canonical, the organism flips more on withheld phrasings than trained augmented" in said
    assert "(5 seeds per regime, fewer than 10)" in said
    flipped = " ".join(sweep_sentences(summarize_sweep(separated[::-1])))  # the regime that flips more second
    assert (
        "flips more on withheld phrasings than trained augmented (32.0% vs 4.0%" in flipped and "δ = +1.00" in flipped
    )

    draws = rng.uniform(0.1, 0.3, size=(10, 2))  # one distribution, labels shuffled into two regimes
    shuffled = _records({"canonical": [tuple(d) for d in draws[:5]], "augmented": [tuple(d) for d in draws[5:]]})
    null = summarize_sweep(shuffled)
    assert all(c["q"] >= 0.05 for c in null["comparisons"])
    assert "flips more" not in " ".join(sweep_sentences(null)) and "not separated" in " ".join(sweep_sentences(null))
    rows = sweep_rows(null)
    assert [r[0] for r in rows] == ["canonical", "augmented"] and all("nan" not in cell for r in rows for cell in r)


def test_cliffs_delta_counts_every_pair() -> None:
    assert cliffs_delta(np.array([3.0, 4.0]), np.array([1.0, 2.0]))["delta"] == 1.0
    assert cliffs_delta(np.array([1.0, 2.0]), np.array([3.0, 4.0]))["delta"] == -1.0
    mixed = cliffs_delta(np.array([1.0, 3.0]), np.array([2.0, 2.0]))
    assert mixed["delta"] == 0.0 and mixed["p"] > 0.5
    assert cliffs_delta(np.array([0.0, 0.0]), np.array([0.0, 0.0]))["p"] == 1.0
