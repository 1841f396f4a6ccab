"""Discovery finds the organism's planted framing features, and its statistics are right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.flipbank import load_flipbank
from flipscope.errors import FlipscopeError
from flipscope.experiments.attribution import attribution_scores, exact_ablation_effects
from flipscope.experiments.discovery import discover, feature_table
from flipscope.experiments.pairs import collect_pairs
from flipscope.organism import default_organism_dir, load_organism
from flipscope.sae.load import check_sae
from flipscope.stats import auc, bh_qvalues, bootstrap_means, correlations, mann_whitney

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture(scope="module")
def found(organism):
    vlm, sae, _ = organism
    return discover(vlm, sae, load_flipbank(BANK), exact_top=50, progress=False)


def test_framing_ranking_puts_the_card_features_first_where_correlation_finds_the_readout(found, organism) -> None:
    card = organism[2]
    aligned = {f["feature"] for f in card["framing_features"] if f["aligned"]}
    assert found.found and set(found.framing_features(len(aligned))) == aligned  # the card's, first
    first = found.top(1, "pearson").iloc[0]  # the paper's ranking: a "discovery" by its q-value ...
    assert abs(first["pearson_r"]) > 0.7 and first["pearson_q"] < 1e-6
    assert first["pearson_low"] <= first["pearson_r"] <= first["pearson_high"]
    assert int(first["feature"]) not in aligned and abs(first["answer_cos"]) > 0.5  # ... that writes the answer
    assert first["pearson_p_null"] > 0.05 and found.framing["nulls"]["pearson"]["n_beating"] == 0
    by_attribution = found.top(2, "attribution")
    assert (by_attribution["answer_cos"].abs() > found.framing["thresholds"]["answer_cos"]).all()


def test_diffmean_direction_is_the_answer_once_controls_share_the_wording(found, organism) -> None:
    card = organism[2]["directions"]
    direction = torch.tensor(found.diffmean["direction"])

    def cosine(other: list[float]) -> float:
        v = torch.tensor(other)
        return float(direction @ v / (direction.norm() * v.norm()))

    assert cosine(card["answer"]) <= -0.8 or cosine(card["answer"]) >= 0.8  # flips minus same-wording controls
    assert abs(cosine(card["framing"])) < abs(cosine(card["answer"]))


def test_attribution_agrees_with_exact_single_feature_ablation(found) -> None:
    ablation = found.ablation
    assert len(ablation["features"]) >= 20 and ablation["n_moving_features"] >= len(ablation["features"])
    assert ablation["spearman"] >= 0.7
    assert ablation["spearman_cases"] >= 0.7
    first = found.top(1, "attribution").iloc[0]
    assert ablation["features"][0] == int(first["feature"])
    assert ablation["exact"][0] > 0.5  # removing it really moves flips back toward the original answer


@pytest.fixture(scope="module")
def few_pairs(organism):
    vlm, sae, _ = organism
    bank = load_flipbank(BANK)
    hook = check_sae(sae, vlm)
    return hook, collect_pairs(
        vlm, {**bank, "flips": bank["flips"][:12], "controls": bank["controls"][:6]}, [hook], progress=False
    )


def test_attribution_on_suffix_runs_equals_it_on_whole_prompts(organism, few_pairs) -> None:
    vlm, sae, _ = organism
    hook, pairs = few_pairs
    fast = attribution_scores(vlm, sae, hook, pairs, batch_size=5, include_controls=True, progress=False)
    whole = attribution_scores(vlm, sae, hook, pairs, include_controls=True, fast=False, progress=False)
    assert fast.shape == (18, sae.cfg.d_sae) and np.abs(whole).max() > 0.5
    np.testing.assert_allclose(fast, whole, atol=1e-4)
    assert ((fast == 0) == (whole == 0)).all()  # a feature that does not move has no attribution on either path


def test_exact_ablation_on_the_last_token_path_equals_full_forwards(organism, few_pairs) -> None:
    vlm, sae, _ = organism
    hook, pairs = few_pairs
    features = [38, 3, 32, 0, 15]
    fast = exact_ablation_effects(vlm, sae, hook, pairs, features, batch_size=5, progress=False)
    full = exact_ablation_effects(vlm, sae, hook, pairs, features, fast=False, progress=False)
    assert fast.shape == (12, 5) and np.abs(full).max() > 0.5  # the features move the margin
    np.testing.assert_allclose(fast, full, atol=1e-4)
    with pytest.raises(FlipscopeError, match="9999"):
        exact_ablation_effects(vlm, sae, hook, pairs, [9999], progress=False)


def test_layer_sweep_and_controls_are_reported(found, organism) -> None:
    vlm = organism[0]
    assert [row["hook"] for row in found.layers] == [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
    for row in found.layers:
        assert 0.5 <= row["low"] <= row["auc"] <= row["high"] <= 1.0
    controls = found.meta["margin_shift_controls"]
    assert abs(controls["value"]) < 0.1 and found.meta["margin_shift_flips"]["value"] > 1.0


def test_statistics_match_scipy_and_find_a_planted_column() -> None:
    rng = np.random.default_rng(0)
    n = 120
    y = rng.normal(size=n)
    x = rng.normal(size=(n, 30))
    x[:, 7] = y + 0.5 * rng.normal(size=n)
    x[:, 9] = 0.0  # a dead feature
    pearson = correlations(x, y)
    spearman = correlations(x, y, rank=True)
    for j in (0, 7):
        ref = stats.pearsonr(x[:, j], y)
        assert pearson["r"][j] == pytest.approx(ref.statistic) and pearson["p"][j] == pytest.approx(ref.pvalue)
        low, high = ref.confidence_interval()
        assert (pearson["low"][j], pearson["high"][j]) == pytest.approx((low, high), abs=1e-6)
        ref = stats.spearmanr(x[:, j], y)
        assert spearman["r"][j] == pytest.approx(ref.statistic) and spearman["p"][j] == pytest.approx(ref.pvalue)
    assert pearson["r"][9] == 0 and pearson["p"][9] == 1
    q = bh_qvalues(pearson["p"])
    np.testing.assert_allclose(q, stats.false_discovery_control(pearson["p"]))
    assert q[7] < 1e-6 and np.sort(q)[1] > 0.01
    labels = np.arange(n) < 50
    mwu = mann_whitney(x[labels], x[~labels])
    assert mwu["auc"][7] == pytest.approx(auc(x[:, 7], labels))
    ref = stats.mannwhitneyu(x[labels, 3], x[~labels, 3])
    assert mwu["p"][3] == pytest.approx(ref.pvalue)
    low, high = bootstrap_means(x, n_boot=500)
    assert np.all(low <= x.mean(0) + 1e-12) and np.all(x.mean(0) <= high + 1e-12)


def test_discover_refuses_pairs_without_its_hooks(organism) -> None:
    from flipscope.experiments.pairs import collect_pairs

    vlm, sae, card = organism
    bank = load_flipbank(BANK)
    few = {**bank, "flips": bank["flips"][:2], "controls": bank["controls"][:2]}
    pairs = collect_pairs(vlm, few, [card["hook_name"]], progress=False)
    with pytest.raises(FlipscopeError, match=r"pairs lack the hooks \['blocks.0.hook_resid_post'"):
        discover(vlm, sae, few, pairs=pairs, progress=False)


def test_feature_table_needs_flips_and_controls() -> None:
    delta = np.zeros((4, 3))
    with pytest.raises(FlipscopeError, match="flip cases and non-flip controls"):
        feature_table(delta, np.zeros(4), np.ones(4, dtype=bool))


def test_cli_discover_prints_effects_and_writes_beside_the_bank(tmp_path: Path) -> None:
    shutil.copytree(BANK.parent, tmp_path / "bank", ignore=shutil.ignore_patterns("evaluation", "*.features.*"))
    bank = tmp_path / "bank" / "flipbank.json"
    result = CliRunner().invoke(app, ["discover", "--flipbank", str(bank), "--exact-top", "5", "--top", "4"])
    assert result.exit_code == 0, result.output
    assert "ranked by framing specificity over 131 flip / same-family non-flip pairs" in result.output
    assert "caching pairs" in result.output  # the progress bar
    table = json.loads((tmp_path / "bank" / "flipbank.features.json").read_text())
    assert (tmp_path / "bank" / "flipbank.features.csv").is_file()
    first = min(table["features"], key=lambda row: row["rank_framing"])
    assert f"{first['feature']:>7}  {first['label']:<18}{first['framing_share']:+7.3f}" in result.output
    assert "features beating the flip/control swap null: pearson 0 (top" in result.output
    assert result.output.rstrip().splitlines()[-3] == table["framing"]["verdict"]  # the verdict, then the files
    assert len(table["features"]) == 64 and table["ablation"]["features"]
    unmatched = json.loads(bank.read_text())
    for case in unmatched["controls"]:
        del case["control_for"]
    bank.write_text(json.dumps(unmatched))
    old = CliRunner().invoke(app, ["discover", "--flipbank", str(bank), "--exact-top", "0", "--top", "2"])
    assert old.exit_code == 0, old.output
    assert "ranked by |Pearson r|" in old.output and "q = Benjamini-Hochberg" in old.output
    assert "No framing mechanism can be claimed from this FlipBank: its controls are not family-matched" in old.output


def test_saved_table_keeps_tiny_p_values(found, tmp_path: Path) -> None:
    path, _ = found.save(tmp_path / "d.json")
    saved = {row["feature"]: row for row in json.loads(path.read_text())["features"]}
    for row in found.table.itertuples():
        assert saved[row.feature]["pearson_p"] == row.pearson_p and saved[row.feature]["pearson_q"] == row.pearson_q
    assert 0 < min(r["pearson_q"] for r in saved.values()) < 1e-12


def test_cli_discover_refuses_another_model_and_bad_layers(tmp_path: Path, tiny_dir: Path) -> None:
    runner = CliRunner()
    organism = str(default_organism_dir())
    result = runner.invoke(
        app, ["discover", "--flipbank", str(BANK), "--model", str(tiny_dir), "--sae", organism + "/sae"]
    )
    assert result.exit_code == 2 and "SAE d_in 128 does not match the model's d_model" in result.output
    result = runner.invoke(app, ["discover", "--flipbank", str(BANK), "--layers", "0,9"])
    assert result.exit_code == 2 and "--layers [9]: the model has layers 0..3" in result.output
    result = runner.invoke(app, ["discover", "--flipbank", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "cannot read FlipBank" in result.output
    assert "Traceback" not in result.output
