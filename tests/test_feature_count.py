"""How many features carry the framing: the count sweep equals the patch of each prefix, resumes
bit for bit, and its sentence is chosen by the numbers — on the shipped organism the entry site's
framing features carry it within a few, its main site's do not, nor do the entry site's least
framing-specific features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flipscope.data.flipbank import load_flipbank
from flipscope.data.store import iter_rows, read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.discovery import discover
from flipscope.experiments.feature_count import MAX_CONTROL, features_needed, summarize_counts
from flipscope.experiments.pairs import collect_pairs
from flipscope.experiments.patching import patch_bank
from flipscope.experiments.sweeps import count_sweep
from flipscope.organism import load_organism, organism_dir
from flipscope.organism.entry_sae import ENTRY_DIR, load_entry_sae

pytestmark = pytest.mark.costly(21)

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def sites():
    """Per SAE of the shipped organism: its hook's pairs and discovery's framing ranking."""
    vlm, sae, _ = load_organism()
    bank = load_flipbank(BANK)
    out = {}
    for name, dictionary in (("main", sae), ("entry", load_entry_sae())):
        hook = dictionary.cfg.metadata.hook_name
        pairs = collect_pairs(vlm, bank, [hook], progress=False)
        found = discover(vlm, dictionary, bank, layers=[], pairs=pairs, exact_top=0, progress=False)
        out[name] = {"sae": dictionary, "pairs": pairs, "found": found}
    return vlm, bank, out


def _counted(sites, name: str, features: list[int], path: Path) -> dict:
    vlm, bank, by_site = sites
    site = by_site[name]
    count_sweep(vlm, site["sae"], bank, features, path, pairs=site["pairs"], progress=False)
    return summarize_counts(iter_rows(path), read_header(path))


def test_each_count_equals_the_patch_of_its_first_k_features(sites, tmp_path: Path) -> None:
    """Each count, its matched controls included, is what `patch` of those k features reports:
    the count matches controls to the first k as `patch` does, so the two never disagree."""
    vlm, bank, by_site = sites
    site = by_site["entry"]
    features = site["found"].framing_features(12)  # the later ones could be an earlier prefix's controls
    summary = _counted(sites, "entry", features, tmp_path / "count.jsonl")
    assert [c["k"] for c in summary["counts"]] == list(range(1, 13))
    for k in (1, 5, 12):
        alone = patch_bank(vlm, site["sae"], bank, features[:k], pairs=site["pairs"], progress=False).summary
        counted = summary["counts"][k - 1]
        assert counted["control_features"] == summary["controls"][k - 1] == alone["setup"]["control_features"]
        assert not set(counted["control_features"]) & set(features[:k]) and len(counted["control_features"]) == k
        for block in ("flips", "matched_control_feature"):
            assert counted[block]["mean_recovery"]["value"] == pytest.approx(
                alone[block]["mean_recovery"]["value"], abs=1e-4
            )
        assert counted["controls"]["mean_margin_change"]["value"] == pytest.approx(
            alone["controls"]["mean_margin_change"]["value"], abs=1e-4
        )


def test_a_rerun_resumes_the_store_and_reads_the_same(sites, tmp_path: Path) -> None:
    vlm, bank, by_site = sites
    features = by_site["entry"]["found"].framing_features(3)
    path = tmp_path / "count.jsonl"
    first = _counted(sites, "entry", features, path)
    rows = read_rows(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # a run that died half-way
    second = _counted(sites, "entry", features, path)
    assert read_rows(path) == rows and second == first


def test_at_the_entry_site_a_few_framing_features_carry_the_framing(sites, tmp_path: Path) -> None:
    features = sites[2]["entry"]["found"].framing_features(8)
    needed = _counted(sites, "entry", features, tmp_path / "count.jsonl")["needed"]
    assert needed["k"] is not None and needed["k"] <= 8, needed["reading"]
    assert f"{needed['k']} of these features are enough to undo the flips" in needed["reading"]


def test_at_the_main_site_no_count_carries_it(sites, tmp_path: Path) -> None:
    """By `blocks.2.hook_resid_post` the framing has become the answer: its framing features, all
    of them, stay under half the margin."""
    features = sites[2]["main"]["found"].framing_features(12)
    needed = _counted(sites, "main", features, tmp_path / "count.jsonl")["needed"]
    assert needed["k"] is None and needed["k_point"] is None
    assert "these features do not undo the flips here" in needed["reading"]


def test_the_least_framing_specific_features_carry_nothing(sites, tmp_path: Path) -> None:
    """The null ranking: the entry SAE's features ranked last for framing specificity."""
    table = sites[2]["entry"]["found"].table
    last = [int(f) for f in table.sort_values("rank_framing")["feature"].iloc[-8:]]
    counted = _counted(sites, "entry", last, tmp_path / "count.jsonl")
    assert counted["needed"]["k"] is None, counted["needed"]["reading"]
    assert max(abs(c["flips"]["mean_recovery"]["value"]) for c in counted["counts"]) < 0.1


def _count(value: float, low: float, control: float | None, n: int = 40, k: int = 1) -> dict:
    est = {"value": value, "low": low, "high": value + (value - low), "n": n}
    out = {"k": k, "flips": {"n": n, "mean_recovery": est}}
    if control is not None:
        out["matched_control_feature"] = {"mean_recovery": {"value": control, "low": control, "high": control}}
    return out


def test_the_sentence_is_chosen_by_the_numbers() -> None:
    carried = features_needed([_count(0.3, 0.2, 0.0, k=1), _count(0.7, 0.6, 0.02, k=2)])
    assert carried["k"] == 2 and carried["k_point"] == 2 and "2 of these features are enough" in carried["reading"]
    unspecific = features_needed([_count(0.7, 0.6, MAX_CONTROL + 0.05)])
    assert unspecific["k"] is None and "not shown to be specific" in unspecific["reading"]
    uncontrolled = features_needed([_count(0.7, 0.6, None)])
    assert uncontrolled["k"] is None and "no matched controls could be found" in uncontrolled["reading"]
    unsettled = features_needed([_count(0.55, 0.4, 0.0)])
    assert unsettled["k"] is None and unsettled["k_point"] == 1 and "do not settle" in unsettled["reading"]
    spread = features_needed([_count(0.1, 0.0, 0.0, k=1), _count(0.3, 0.2, 0.0, k=2)])
    assert spread["k"] is None and "(all 2 together: 0.30 [0.20, 0.40])" in spread["reading"]
    few = features_needed([_count(0.7, 0.6, 0.0, n=6)])
    assert few["reading"].startswith("From 6 flips (fewer than 10")
    assert all("nan" not in r["reading"] for r in (carried, unspecific, uncontrolled, unsettled, spread, few))


def test_a_store_with_one_nested_control_list_reads_as_its_prefixes() -> None:
    """Stores written before each count had its own controls list them once, for the whole ranking."""
    rows = [
        {"variant": f"{kind}:{k}", "case": "a", "kind": "flip", "direction": "no→yes", "m_orig": 2.0,
         "m_para": -1.0, "m_patched": patched}
        for k in (1, 2) for kind, patched in (("features", 0.5 * k), ("controls", -1.0))
    ]  # fmt: skip
    header = {"kind": "count-sweep", "hook": "h", "features": [1, 2], "controls": [7, 9]}
    summary = summarize_counts(rows, header)
    assert summary["controls"] == [[7], [7, 9]]
    assert [c["control_features"] for c in summary["counts"]] == [[7], [7, 9]]
    assert summary["counts"][1]["matched_control_feature"]["mean_recovery"]["value"] == pytest.approx(0.0)


def test_bad_input_says_what_is_wrong(sites, tmp_path: Path) -> None:
    vlm, bank, by_site = sites
    with pytest.raises(FlipscopeError, match="name a feature twice"):
        count_sweep(vlm, by_site["entry"]["sae"], bank, [3, 3], tmp_path / "c.jsonl", progress=False)
    with pytest.raises(FlipscopeError, match="expected 'count-sweep'"):
        summarize_counts([], {"kind": "patch-sweep"})
    header = {"kind": "count-sweep", "hook": "h", "features": [1, 2]}
    with pytest.raises(FlipscopeError, match="no rows for the first 2 features"):
        row = {"variant": "features:1", "case": "a", "kind": "flip", "direction": "no→yes"}
        summarize_counts([row | {"m_orig": 2.0, "m_para": -1.0, "m_patched": 0.5}], header)
    with pytest.raises(FlipscopeError, match="no counts"):
        features_needed([])


def test_the_patch_command_counts_and_prints_the_reading(tmp_path: Path) -> None:
    from flipscope.cli import app

    out = tmp_path / "patch"
    args = ["patch", "--flipbank", str(BANK), "--features", "10,62,39", "--out", str(out), "--count",
            "--sae", str(organism_dir(None) / ENTRY_DIR), "--no-wording-bound"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "count.json").read_text())
    assert [c["features"] for c in summary["counts"]] == [[10], [10, 62], [10, 62, 39]]
    assert summary["needed"]["reading"] in result.output and "nan" not in result.output
    bad = CliRunner().invoke(app, [*args, "--positions", "all"])
    assert bad.exit_code != 0 and "--count patches the last position" in bad.output
