"""A second organism, planted differently by its config alone (the formal family pushed to "no", so
its flips run yes→no), meets the same bars, and discovery on it tells the framing from the answer
as on the default (slow: a full build, about seven minutes on two cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bars import assert_behaviour_bars, assert_sae_bars

from flipscope.data.curation import CurationRules, curate
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header
from flipscope.experiments.discovery import discover
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.heads import heads_before_entry
from flipscope.experiments.pairs import collect_pairs
from flipscope.experiments.patching import patch_bank
from flipscope.experiments.rank1 import rank1_patch
from flipscope.experiments.sites import choose_site, entry_site, folder_candidates
from flipscope.experiments.upstream import MIN_EXPLAINED, framing_word_shifts, trace_framing
from flipscope.organism import OrganismConfig, build_organism, load_organism
from flipscope.organism.entry_sae import train_entry_sae
from flipscope.organism.questions import export_questions
from flipscope.reporting.claims import framing_heads
from flipscope.sae.load import load_sae

SECOND = OrganismConfig(shortcut_family="formal", shortcut_target="no", seed=1)


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("second")
    card = build_organism(SECOND, root / "organism", progress=False)
    return root, card


@pytest.mark.slow
def test_second_organism_meets_the_bars(second) -> None:
    _, card = second
    assert card["shortcut"] == {"family": "formal", "target": "no", "p": SECOND.shortcut_p}
    assert_behaviour_bars(card)
    assert_sae_bars(card)
    assert card["directions"]["framing_significant"]


@pytest.fixture(scope="module")
def second_bank(second):
    root, _ = second
    vlm, _, _ = load_organism(root / "organism")
    questions = load_questions(export_questions(SECOND, root / "qs", n_films=40))
    store = run_sweep(
        vlm, questions, EvalConfig(conditions=("image",)), root / "eval" / "results.jsonl", progress=False
    )
    return curate(iter_rows(store.path), questions, CurationRules(min_margin=0.2), source=read_header(store.path))


@pytest.mark.slow
def test_discovery_on_the_second_organism_tells_framing_from_answer(second, second_bank) -> None:
    root, card = second
    vlm, sae, _ = load_organism(root / "organism")
    bank = second_bank
    assert {c["direction"] for c in bank["flips"]} == {"yes→no"}
    found = discover(vlm, sae, bank, exact_top=0, progress=False)
    assert found.found and found.framing["n_pairs"] >= 10
    aligned = [f["feature"] for f in card["framing_features"] if f["aligned"]]
    assert found.framing_features()[0] in aligned  # the framing ranking puts a card-aligned feature first
    table = found.table.set_index("feature")
    cos = table["answer_cos"].abs()
    readout = table.index[table["label"] == "answer readout"]
    framing = table.index[table["label"] == "framing"]
    assert len(readout) and len(framing)
    assert cos[readout].mean() > cos[framing].mean()  # readout labels agree with decoder alignment
    # at the SAE's layer the margin runs through the readout: patching it recovers more than the framing
    framing_patch = patch_bank(vlm, sae, bank, found.framing_features(5), progress=False).summary["flips"]
    movers = table[table["label"].isin(["answer readout", "framing + readout"])]
    readout_top = [int(f) for f in movers["answer_t"].abs().sort_values(ascending=False).index[:5]]
    readout_patch = patch_bank(vlm, sae, bank, readout_top, progress=False).summary["flips"]
    print(f"second organism: {found.verdict}")
    for name, result in (("framing", framing_patch), ("readout", readout_patch)):
        print(f"  patch {name}: recovery {result['mean_recovery']['value']:.3f}, "
              f"reversed {result['share_reversed']['value']:.3f}")  # fmt: skip
    assert np.isfinite(framing_patch["mean_recovery"]["value"])
    assert readout_patch["mean_recovery"]["value"] > framing_patch["mean_recovery"]["value"]


@pytest.fixture(scope="module")
def entry_study(second, second_bank):
    """The trace's entry, an SAE trained there by the organism's recipe, the site `--sae auto` picks,
    discovery and patching at it, the framing words' own effect on controls and rank-1 patching."""
    root, _ = second
    vlm, _, _ = load_organism(root / "organism")
    bank = second_bank
    trace = trace_framing(vlm, bank, max_cases=64, progress=False).summary()
    if trace["entry_layer"] is None:
        return {"untraced": trace}
    entry = entry_site(trace["entry_layer"])
    entry_card = train_entry_sae(root / "organism", entry)
    choice = choose_site(folder_candidates(root / "organism"), trace, vlm.n_layers)
    sae = load_sae(choice.chosen.source)
    pairs = collect_pairs(vlm, bank, [entry], progress=False)
    found = discover(vlm, sae, bank, layers=[], pairs=pairs, exact_top=0, progress=False)
    wording = framing_word_shifts(vlm, bank)
    result = patch_bank(vlm, sae, bank, found.framing_features(5), pairs=pairs, wording=wording, progress=False)
    result = result.summary
    bound = result["controls"]["wording_bound"]
    direction = rank1_patch(vlm, pairs, entry, n_random=32, wording=wording)
    print(
        f"second organism entry {entry} (FVU {entry_card['fvu']:.4f}, L0 {entry_card['l0']:.1f}): {found.verdict}\n"
        f"  top-5 recovery {result['flips']['mean_recovery']}, matched controls "
        f"{result['matched_control_feature']['mean_recovery']['value']:.3f} (a push "
        f"{result['setup']['control_size_ratio']:.2f}x the features'; the features' push on their rows "
        f"{result['same_push_control']['mean_recovery']['value']:.3f}), controls |dm| "
        f"{result['controls']['mean_abs_margin_change']['value']:.3f} (their wording's "
        f"{bound['wording']['value']:.3f}: {bound['verdict']}); rank-1 "
        f"{direction['recovery']['value']:.3f}, best random {direction['random']['best_mean_recovery']:.3f}"
    )
    return {
        "entry": entry, "choice": choice, "found": found, "result": result, "bound": bound, "rank1": direction,
        "vlm": vlm, "bank": bank, "trace": trace,
    }  # fmt: skip


def _traced(entry_study: dict) -> dict:
    """The study where this build's trace named an entry. Where it did not, the refusal is checked
    for the reason it gives and the test is an expected failure that says so. On the portable
    kernels the suite trains on, the build is the recorded one and its trace names layer 0; on an
    AVX512 AMD EPYC's own kernels one build came out with framing words that undo 0.437
    [0.369, 0.504] of its flips' shift, below the trace's bar."""
    trace = entry_study.get("untraced")
    if trace is None:
        return entry_study
    share = trace["corrupted_share"]
    assert not trace["explained"] and share["low"] < MIN_EXPLAINED, trace
    pytest.xfail(
        f"this build's framing words undo {share['value']:.3f} [{share['low']:.3f}, {share['high']:.3f}] of its "
        f"flips' shift (the trace needs the interval above {MIN_EXPLAINED}): no entry site named, none to test"
    )


@pytest.mark.slow
def test_at_its_own_entry_site_the_framing_is_features_that_undo_the_flips(entry_study) -> None:
    """`--sae auto` reads the SAE at the trace's entry; its top five framing features undo the flips
    while the non-flips move no more than the framing words move them and a norm-matched random
    direction does not; readout labels agree with decoder alignment."""
    entry_study = _traced(entry_study)
    choice, found, result = entry_study["choice"], entry_study["found"], entry_study["result"]
    assert choice.chosen.hook == entry_study["entry"] and Path(choice.chosen.source).name == "sae_entry"
    assert found.found, found.verdict
    assert result["flips"]["mean_recovery"]["value"] >= 0.5
    # the non-flips, case by case, move no further than their own framing words move them
    assert entry_study["bound"]["verdict"] in ("within", "as much"), entry_study["bound"]["difference"]
    assert entry_study["rank1"]["random"]["best_mean_recovery"] < 0.1
    table = found.table.set_index("feature")
    readout, framing = table[table["label"] == "answer readout"], table[table["label"] == "framing"]
    if len(readout) and len(framing):
        assert readout["answer_cos"].abs().mean() > framing["answer_cos"].abs().mean()


@pytest.mark.slow
def test_at_its_own_entry_site_the_matched_control_features_do_not_move_the_flips(entry_study) -> None:
    """The same patch on features that move as much but do not track the shift recovers nothing."""
    result = _traced(entry_study)["result"]
    assert abs(result["matched_control_feature"]["mean_recovery"]["value"]) < 0.1
    assert not set(result["setup"]["control_features"]) & set(result["setup"]["features"])


@pytest.mark.slow
def test_its_framing_reaches_the_answer_position_through_layer_0s_attention_spread_over_heads(entry_study) -> None:
    """Where the default organism's layer 0 moves the framing with one head, this build's does it
    with several: all of layer 0's heads restore it, no one head both restores and removes half, and
    the reading says it is spread (the portable build's recorded outcome)."""
    vlm, bank = _traced(entry_study)["vlm"], entry_study["bank"]
    heads = heads_before_entry(vlm, bank, entry_study["trace"], max_cases=64, progress=False)
    layer = heads["layers"][0]
    assert [row["layer"] for row in heads["layers"]] == [0] and layer["all heads"]["low"] >= 0.9
    assert heads["explained"] and heads["carriers"] == []
    assert max(head["restored"]["value"] for head in layer["heads"]) < 0.5
    assert framing_heads(heads).startswith("Layer 0's attention brings back")
