"""Where the framing lives, on the shipped organism and its FlipBank: the logit lens reads the model's
own margin at the last layer and shows flips diverging far more than same-family non-flips; one
direction at the entry site (layer 0's attention output) undoes the flips, while norm-matched random
directions do not and the non-flips move no more than their own wording moves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.data.flipbank import load_flipbank
from flipscope.errors import FlipscopeError
from flipscope.experiments.lens import LensTrajectory, lens_margins, lens_trajectory
from flipscope.experiments.pairs import collect_pairs
from flipscope.experiments.rank1 import rank1_patch
from flipscope.model.hook_names import resid_post
from flipscope.organism import load_organism
from flipscope.reporting.claims import lens_reading
from flipscope.reporting.format import fmt

pytestmark = pytest.mark.costly(21)

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
ENTRY = "blocks.0.hook_attn_out"
# the mean |margin change| of the same-family non-flips when their framing words are corrupted
# (flipscope trace on the shipped organism): what removing the framing may move them by
CORRUPTION_BOUND = 1.07


@pytest.fixture(scope="module")
def setup():
    vlm, _, _ = load_organism()
    bank = load_flipbank(BANK)
    hooks = [ENTRY, *(resid_post(i) for i in range(vlm.n_layers))]
    return vlm, bank, collect_pairs(vlm, bank, hooks, progress=False)


def test_the_lens_at_the_last_layer_is_the_models_margin(setup) -> None:
    vlm, _, pairs = setup
    last = resid_post(vlm.n_layers - 1)
    torch.testing.assert_close(lens_margins(vlm, pairs.para[last]), pairs.margin_para, atol=1e-4, rtol=1e-5)


def test_flips_diverge_under_the_lens_far_more_than_non_flips(setup) -> None:
    vlm, bank, pairs = setup
    summary = lens_trajectory(vlm, bank, pairs=pairs).summary()
    assert summary["n_flips"] == len(bank["flips"]) and summary["n_controls"] == len(bank["controls"])
    assert summary["first_divergent_layer"] == 0
    for row in summary["layers"]:
        assert row["ratio"]["low"] > 1 and row["r_flip"] > 0.5
    # by the last layer the lens gives every flip's final answer
    assert summary["commit_layer"]["n"] == summary["n_flips"]


def test_the_flips_diverge_beyond_what_choosing_them_for_crossing_zero_gives(setup) -> None:
    vlm, bank, pairs = setup
    summary = lens_trajectory(vlm, bank, pairs=pairs).summary()
    assert summary["first_layer_beyond_selection"] == 0
    for row in summary["layers"]:
        null = row["selection"]
        assert 1 < null["ratio"] < row["ratio"]["low"]  # selection gives some excess, the framing more
        assert null["p_value"] < 0.01 and null["n_shuffles"] == 1000


def _trajectory(push: float, seed: int = 0) -> LensTrajectory:
    """Two wordings, 200 cases each, whose shifts are noise, plus `push` toward the other answer on
    the cases it carries across zero more easily (those nearest it): a case-specific effect."""
    rng = np.random.default_rng(seed)
    n = 400
    orig = rng.normal(0, 3, n)
    shift = rng.normal(0, 1.5, n) - push * np.sign(orig) * (np.abs(orig) < 3)
    layers = np.linspace(0.5, 1, 3)[:, None]
    return LensTrajectory(
        layers=[0, 1, 2], orig=layers * orig, para=layers * (orig + shift),
        is_flip=(orig > 0) != (orig + shift > 0), final_orig=orig, final_para=orig + shift,
        family=np.repeat(["a", "b"], n // 2),
    )  # fmt: skip


def test_the_selection_null_holds_noise_shifts_and_finds_case_specific_ones() -> None:
    """Noise shifts make flips diverge more than non-flips (they are chosen for crossing zero), and
    the selection null says no more; a push that only acts on some cases is found beyond it."""
    for seed in range(3):
        noise = _trajectory(0.0, seed).summary()
        assert all(row["ratio"]["low"] > 1 for row in noise["layers"])  # the raw ratio is fooled
        assert noise["first_layer_beyond_selection"] is None, [r["selection"] for r in noise["layers"]]
        assert "Selection alone gives as much" in lens_reading(noise)
        pushed = _trajectory(2.0, seed).summary()
        assert pushed["first_layer_beyond_selection"] == 0
        assert "more than choosing flips for crossing zero gives" in lens_reading(pushed)
    # one flip diverging far more than the non-flips: resampling it never varies, so no layer is named
    lone = _trajectory(2.0)
    keep = ~lone.is_flip
    flips = np.flatnonzero(lone.is_flip)
    keep[flips[np.argmax(lone.divergence[-1, flips])]] = True  # the flip that diverges most
    one = LensTrajectory(
        layers=lone.layers, orig=lone.orig[:, keep], para=lone.para[:, keep], is_flip=lone.is_flip[keep],
        final_orig=lone.final_orig[keep], final_para=lone.final_para[keep], family=lone.family[keep],
    )  # fmt: skip
    summary = one.summary()
    assert summary["n_flips"] == 1 and summary["first_divergent_layer"] is None
    assert any(row["ratio"]["low"] > 1 for row in summary["layers"])  # the controls' spread alone would name one


@pytest.fixture(scope="module")
def wording(setup) -> dict[str, float]:
    """Each non-flip's |margin change| when its own framing words are corrupted."""
    from flipscope.experiments.upstream import framing_word_shifts

    vlm, bank, _ = setup
    return framing_word_shifts(vlm, bank)


@pytest.fixture(scope="module")
def entry_rank1(setup, wording) -> dict:
    vlm, _, pairs = setup
    return rank1_patch(vlm, pairs, ENTRY, n_random=32, wording=wording)


def test_one_direction_at_the_entry_undoes_the_flips_and_random_ones_do_not(setup, entry_rank1) -> None:
    vlm, _, pairs = setup
    found = entry_rank1
    assert found["recovery"]["value"] >= 0.9 and found["recovery"]["n"] == int(pairs.is_flip.sum())
    null = found["random"]
    assert null["n_directions"] == 32 and null["n_drawn"] == 256
    assert null["median_mean_recovery"] <= 0.05 < 0.9 <= found["recovery"]["value"]
    assert null["median_mean_recovery"] < null["best_mean_recovery"] <= null["largest_drawn"]
    assert null["best_mean_recovery"] < 0.1 and null["p_value"] == 1 / 257  # no drawn direction comes close
    # the non-flips move less than their own framing words move them, paired case by case
    bound = found["controls"]["wording_bound"]
    assert bound["verdict"] == "within" and bound["n"] == found["controls"]["n"] == len(pairs.cases) - found["n_flips"]
    assert bound["patch"]["value"] == found["controls"]["mean_abs_margin_change"]["value"] <= CORRUPTION_BOUND
    # the null's draws do not depend on how many the forward pass takes at once
    again = rank1_patch(vlm, pairs, ENTRY, n_random=4, n_draws=16, rows_per_forward=40)
    first = rank1_patch(vlm, pairs, ENTRY, n_random=4, n_draws=16)
    assert again["random"]["best_mean_recovery"] == pytest.approx(first["random"]["best_mean_recovery"], abs=1e-5)
    with pytest.raises(FlipscopeError, match="needs n_draws ≥ 8"):
        rank1_patch(vlm, pairs, ENTRY, n_random=8, n_draws=4)


@pytest.mark.xfail(
    strict=True,
    reason="measured on the shipped organism at blocks.0.hook_attn_out: the expected best of 32 norm-matched random "
    "directions (from 256) recovers 0.059 of the margin; the bar is 0.05 (the median direction recovers 0.014)",
)
def test_the_best_of_32_random_directions_recovers_at_most_005(entry_rank1) -> None:
    assert entry_rank1["random"]["best_mean_recovery"] <= 0.05


def test_the_lens_command_prints_both_readings_and_writes_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flipscope.cli import app

    out = tmp_path / "lens.json"
    args = ["lens", "--flipbank", str(BANK), "--layers", "0,3", "--sites", ENTRY, "--n-random", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert [row["layer"] for row in written["lens"]["layers"]] == [0, 3]
    assert [row["hook"] for row in written["rank1"]] == [ENTRY, resid_post(0), resid_post(3)]
    first = written["rank1"][0]
    assert f"{ENTRY:<28}{fmt(first['recovery']):<30}" in result.output
    bound = first["controls"]["wording_bound"]  # the non-flips against their own wording, at every site
    assert all(row["controls"]["wording_bound"]["wording"] == bound["wording"] for row in written["rank1"])
    assert f"{first['controls']['mean_abs_margin_change']['value']:>16.3f}  {bound['verdict']}" in result.output
    assert f"moves them by {fmt(bound['wording'])}" in result.output
    assert "commit layer" in result.output and f"lens: {out}" in result.output
    bad = CliRunner().invoke(app, ["lens", "--flipbank", str(BANK), "--sites", "blocks.9.hook_nope"])
    assert bad.exit_code == 2 and "unknown hook name 'blocks.9.hook_nope'" in bad.output


def test_at_the_entry_the_framing_is_features_and_they_undo_the_flips(setup, wording) -> None:
    """The organism's entry-site SAE (`flipscope organism entry-sae`): its five most
    framing-specific features recover half the margin, where those of the layer-2 SAE recover a
    fifth; the matched control feature recovers nothing; the non-flips move about as much as their
    own framing words move them (0.01 more on average, a paired difference whose CI reaches 0)."""
    from flipscope.experiments.discovery import discover
    from flipscope.experiments.patching import patch_bank
    from flipscope.organism.entry_sae import load_entry_sae

    vlm, bank, pairs = setup
    sae = load_entry_sae()
    assert sae.cfg.metadata.hook_name == ENTRY
    found = discover(vlm, sae, bank, pairs=pairs, exact_top=0, progress=False)
    assert found.found and f"carry the wording at {ENTRY}" in found.verdict
    chosen = found.framing_features(5)
    summary = patch_bank(vlm, sae, bank, chosen, pairs=pairs, wording=wording, progress=False).summary
    assert summary["flips"]["mean_recovery"]["value"] >= 0.5
    assert abs(summary["matched_control_feature"]["mean_recovery"]["value"]) < 0.1
    bound = summary["controls"]["wording_bound"]
    assert bound["verdict"] in ("within", "as much") and bound["difference"]["low"] <= 0
    assert bound["patch"]["value"] == summary["controls"]["mean_abs_margin_change"]["value"]


def test_the_corruption_bound_is_what_the_framing_words_move_the_non_flips_by(setup, wording) -> None:
    from flipscope.experiments.upstream import framing_word_shifts

    vlm, bank, _ = setup
    moved = np.fromiter(wording.values(), np.float64)
    assert list(wording) == [c["id"] for c in bank["controls"]]  # every control has words of its own wording
    assert abs(float(moved.mean()) - CORRUPTION_BOUND) < 0.01
    flips = np.fromiter(framing_word_shifts(vlm, bank, which="flips").values(), np.float64)
    assert flips.mean() > 4 * moved.mean()  # on flips the wording moves the margin across zero


def test_the_width_study_runs_on_the_shipped_organism_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    """`analyses/null_width.py` at width 128 reads the shipped organism (no training), patches at the
    entry the trace names, and a rerun reads its row back instead of recomputing it."""
    import importlib.util

    script = Path(__file__).parents[1] / "analyses" / "null_width.py"
    spec = importlib.util.spec_from_file_location("null_width", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    argv = ["null_width.py", "--widths", "128", "--work", str(tmp_path), "--films", "6"]
    argv += ["--n-random", "2", "--trace-cases", "8"]
    monkeypatch.setattr("sys.argv", argv)
    study.main()
    first = capsys.readouterr().out
    rows = json.loads((tmp_path / study.ROWS).read_text())["rows"]
    assert [r["width"] for r in rows] == [128] and rows[0]["entry"] == ENTRY
    assert not (tmp_path / "w128").exists()  # the shipped organism, not a retrained one
    row = rows[0]
    assert row["recovery"]["value"] > 0.9 > row["random"]["best_mean_recovery"]
    assert f"{row['recovery']['value']:>7.3f}" in first
    stamp = (tmp_path / study.ROWS).stat().st_mtime_ns
    monkeypatch.setattr(study, "measure", None)  # a rerun must not measure again
    study.main()
    assert capsys.readouterr().out == first and (tmp_path / study.ROWS).stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="width 130 is not a multiple of the 4 heads"):
        study.width_config(130)
