"""Patching and clamping: invariants, the organism's planted mechanism, controls, bad input, no leftover hooks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.data.flipbank import load_flipbank
from flipscope.data.store import read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.pairs import collect_pairs, pair_specs
from flipscope.experiments.patching import patch_bank, patched_margins, subtract_at_last
from flipscope.experiments.sweeps import layer_sweep, patch_sweep
from flipscope.interventions.edited import ClampedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism import load_organism
from flipscope.reporting.claims import wording_bound_reading

pytestmark = pytest.mark.costly(47)

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def setup():
    vlm, sae, card = load_organism()
    bank = load_flipbank(BANK)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
    pairs = collect_pairs(vlm, bank, hooks, progress=False)
    return vlm, sae, card, bank, pairs


def _no_hooks_left(vlm) -> bool:
    return all(not point.fwd_hooks and not point.bwd_hooks for point in vlm.hook_dict.values())


def test_zero_delta_patch_is_bit_identical(setup) -> None:
    vlm, _, card, _, pairs = setup
    specs, _, para = pair_specs(pairs.cases[:12])
    inputs = vlm.prompts.build([specs[i] for i in para])
    zero = torch.zeros(12, vlm.d_model)
    assert torch.equal(patched_margins(vlm, inputs, card["hook_name"], zero), vlm.score(inputs))


def test_clamping_a_silent_feature_to_its_value_changes_nothing(setup) -> None:
    vlm, sae, card, _, _ = setup
    batch = vlm.prompts.build(
        [
            PromptSpec(question="Is the suspected opacity there?", condition="blank"),
            PromptSpec(question="Is there a pneumothorax?", condition="none"),
        ]
    )
    _, cache = vlm.run_with_cache(batch, names_filter=card["hook_name"])
    acts = sae.encode(cache[card["hook_name"]]).detach()
    silent = int(torch.nonzero(acts.amax((0, 1)) == 0)[0])
    clamped = ClampedVLM(vlm, sae, {silent: 0.0})
    torch.testing.assert_close(clamped(batch), vlm(batch), rtol=1e-5, atol=1e-5)
    framing = card["framing_features"][0]["feature"]
    moved = ClampedVLM(vlm, sae, {framing: 0.0}).score(batch)
    assert (moved - vlm.score(batch)).abs().max() > 0.1  # the framing feature matters
    assert _no_hooks_left(vlm)


def test_original_vector_at_the_last_layer_recovers_everything(setup, tmp_path: Path) -> None:
    vlm, _, _, bank, pairs = setup
    store = layer_sweep(vlm, bank, tmp_path / "layers.jsonl", pairs=pairs, progress=False)
    last = [r for r in read_rows(store.path) if r["variant"] == vlm.n_layers - 1 and r["kind"] == "flip"]
    recovery = [(r["m_patched"] - r["m_para"]) / (r["m_orig"] - r["m_para"]) for r in last]
    np.testing.assert_allclose(recovery, 1.0, atol=1e-4)


def test_fast_patch_path_equals_full_forwards(setup, tmp_path: Path) -> None:
    vlm, sae, _, bank, pairs = setup
    few = {**bank, "flips": bank["flips"][:9], "controls": bank["controls"][:3]}
    sub = collect_pairs(vlm, few, list(pairs.orig), progress=False)
    features = list(range(0, 64, 5))
    fast = read_rows(patch_sweep(vlm, sae, few, features, tmp_path / "f.jsonl", pairs=sub, progress=False).path)
    full = read_rows(
        patch_sweep(vlm, sae, few, features, tmp_path / "s.jsonl", pairs=sub, fast=False, progress=False).path
    )
    assert [(r["case"], r["variant"]) for r in fast] == [(r["case"], r["variant"]) for r in full]
    np.testing.assert_allclose([r["m_patched"] for r in fast], [r["m_patched"] for r in full], atol=1e-4)
    assert any(abs(r["m_patched"] - r["m_para"]) > 0.1 for r in fast)  # some patch really moved a margin
    fast = read_rows(layer_sweep(vlm, few, tmp_path / "lf.jsonl", pairs=sub, progress=False).path)
    full = read_rows(layer_sweep(vlm, few, tmp_path / "ls.jsonl", pairs=sub, fast=False, progress=False).path)
    np.testing.assert_allclose([r["m_patched"] for r in fast], [r["m_patched"] for r in full], atol=1e-4)
    # patch_bank: the features' patch and both controls' on one cache per paraphrase
    banked = [patch_bank(vlm, sae, few, [5, 17], pairs=sub, fast=f, progress=False).rows for f in (True, False)]
    keys = ("m_patched", "m_control_feature", "m_same_push")
    fast, full = ([[r[k] for k in keys] for r in rows] for rows in banked)
    np.testing.assert_allclose(fast, full, atol=1e-4)
    assert all(max(abs(r[k] - r["m_para"]) for r in banked[0]) > 0.01 for k in keys)  # each patch moves a margin


def test_removing_the_framing_features_reverses_flips_but_the_readout_carries_the_margin(setup) -> None:
    vlm, sae, card, bank, pairs = setup
    aligned = [f["feature"] for f in card["framing_features"] if f["aligned"]]
    result = patch_bank(vlm, sae, bank, aligned, pairs=pairs, progress=False)
    flips = result.summary["flips"]
    assert flips["n"] == bank["n_flips"]
    assert flips["share_reversed"]["value"] >= 0.5  # the flipped margins sit just above 0
    control = result.summary["matched_control_feature"]
    controls = result.summary["setup"]["control_features"]
    assert len(set(controls)) == len(aligned) and not set(controls) & set(aligned)
    # the controls do not track the shift, and the report says how large their own patch is
    from flipscope.sae.encode import decoder_vectors
    from flipscope.stats import correlations

    is_flip = torch.from_numpy(pairs.is_flip)
    delta = pairs.feature_delta(sae, card["hook_name"])[is_flip].double()
    r = correlations(delta[:, controls].numpy(), pairs.margin_shift[is_flip].double().numpy())["r"]
    assert np.all(np.abs(r) < 0.1)
    own = decoder_vectors(sae, delta[:, controls].float(), controls).norm(dim=1)
    patched = decoder_vectors(sae, delta[:, aligned].float(), aligned).norm(dim=1)
    ratio = result.summary["setup"]["control_size_ratio"]
    assert ratio == pytest.approx(float((own / patched).mean()), rel=1e-4) and 0 < ratio < 1
    given = patch_bank(vlm, sae, bank, aligned, control_features=controls, pairs=pairs, progress=False).summary
    assert given["matched_control_feature"] == control and "same_push_control" in given
    assert (
        flips["mean_recovery"]["low"] > control["mean_recovery"]["high"]
        and abs(control["mean_recovery"]["value"]) < 0.1
    )
    assert result.summary["controls"]["share_answer_kept"]["value"] == 1.0  # same-family non-flips keep their answers
    # at the SAE's layer most of the margin already runs through features that write "no" (32, 0):
    readout = patch_bank(vlm, sae, bank, [32, 0], pairs=pairs, progress=False).summary["flips"]
    assert readout["mean_recovery"]["value"] > 2 * flips["mean_recovery"]["value"]


def test_with_no_other_feature_moving_the_patch_runs_and_says_it_has_no_control(setup) -> None:
    vlm, sae, card, bank, pairs = setup
    aligned = [f["feature"] for f in card["framing_features"] if f["aligned"]]
    silenced = copy.deepcopy(sae)
    with torch.no_grad():
        others = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
        others[aligned] = False
        silenced.threshold[others] = 1e9  # every other feature is dead: none can serve as a control
    summary = patch_bank(vlm, silenced, bank, aligned, pairs=pairs, progress=False).summary
    assert summary["setup"]["control_features"] is None and "matched_control_feature" not in summary
    assert summary["setup"]["no_control"].startswith("only 0 other features move")
    plain = patch_bank(vlm, sae, bank, aligned, pairs=pairs, control_features=None, progress=False).summary
    recovered = (s["flips"]["mean_recovery"]["value"] for s in (summary, plain))
    assert next(recovered) == pytest.approx(next(recovered), abs=1e-5)  # the patch itself is the same
    with pytest.raises(FlipscopeError, match="must be one per patched feature"):  # given controls are still checked
        patch_bank(vlm, silenced, bank, aligned, pairs=pairs, control_features=aligned, progress=False)


def test_bad_input_is_named_and_no_hook_survives_an_error(setup, tiny_dir: Path) -> None:
    vlm, sae, card, bank, pairs = setup
    with pytest.raises(FlipscopeError, match="feature index 64 is out of range; the SAE has 64 features"):
        patch_bank(vlm, sae, bank, [38, 64], pairs=pairs, progress=False)
    with pytest.raises(FlipscopeError, match="feature index -1 is out of range"):
        ClampedVLM(vlm, sae, {-1: 0.0})
    with pytest.raises(FlipscopeError, match=r"control features \[1\] must be one per patched feature \[38, 3\]"):
        patch_bank(vlm, sae, bank, [38, 3], control_features=[1], pairs=pairs, progress=False)
    with pytest.raises(FlipscopeError, match=r"control features \[38, 1\] must be one per patched feature"):
        patch_bank(vlm, sae, bank, [38, 3], control_features=[38, 1], pairs=pairs, progress=False)
    with pytest.raises(FlipscopeError, match="positions 'middle' is unknown"):
        patch_bank(vlm, sae, bank, [38], positions="middle", pairs=pairs, progress=False)
    from flipscope.model import HookedVLM

    tiny = HookedVLM.from_pretrained(tiny_dir)
    with pytest.raises(FlipscopeError, match=r"SAE d_in 128 does not match the model's d_model"):
        ClampedVLM(tiny, sae, {38: 0.0})
    with pytest.raises(FlipscopeError, match="d_in 128 does not match"):
        patch_bank(tiny, sae, bank, [38], progress=False)

    def explode(x, hook):
        raise RuntimeError("boom")

    inputs = vlm.prompts.build([PromptSpec(question="Is there an opacity?", condition="blank")])
    with pytest.raises(RuntimeError, match="boom"):
        ClampedVLM(vlm, sae, {38: 0.0}).run_with_hooks(inputs, fwd_hooks=[("blocks.3.hook_resid_post", explode)])
    assert _no_hooks_left(vlm)
    with (
        pytest.raises(RuntimeError, match="boom"),
        vlm.hooks(fwd_hooks=[(card["hook_name"], subtract_at_last(torch.zeros(1, 128)))]),
    ):
        vlm.run_with_hooks(inputs, fwd_hooks=[("blocks.3.hook_resid_post", explode)])
    assert _no_hooks_left(vlm)
    torch.testing.assert_close(vlm.score(inputs), vlm.score(inputs))


def test_clamping_the_framing_feature_cuts_flips_at_no_accuracy_cost(setup, tmp_path: Path) -> None:
    from flipscope.data.questions import load_questions
    from flipscope.experiments.clamping import compare_clamped
    from flipscope.experiments.evaluation import EvalConfig, run_sweep

    vlm, sae, card, _, _ = setup
    questions = load_questions(BANK.parent / "questions.jsonl")
    feature = card["framing_features"][0]["feature"]
    report = compare_clamped(vlm, sae, questions, [{feature: 0.0}], tmp_path / "clamp", progress=False)
    paired = report["interventions"][0]["paired"]
    assert paired["flip_rate"]["relative_change"] <= -0.5 and paired["flip_rate"]["change"]["high"] < 0
    assert paired["flip_rate"]["mcnemar_p"] < 0.01
    assert paired["accuracy"]["change"]["value"] >= -0.02
    before = report["baseline"]["by_strategy"]["leading"]["text_only_agreement"]
    after = report["interventions"][0]["summary"]["by_strategy"]["leading"]["text_only_agreement"]
    assert after["high"] < before["low"]
    # the clamped model runs on the evaluation's shared-prefix path exactly as on plain batches
    clamped = ClampedVLM(vlm, sae, {feature: 0.0})
    few = questions[:6]
    cfg = EvalConfig(conditions=("image", "blank"))
    fast = read_rows(run_sweep(clamped, few, cfg, tmp_path / "fast.jsonl", progress=False).path)
    slow_cfg = EvalConfig(conditions=("image", "blank"), fast=False)
    slow = read_rows(run_sweep(clamped, few, slow_cfg, tmp_path / "slow.jsonl", progress=False).path)
    np.testing.assert_allclose([r["margin"] for r in fast], [r["margin"] for r in slow], atol=1e-4)
    # the baseline and the clamped model share one tower run per film, the bits of their own runs
    plain = read_rows(run_sweep(vlm, few, cfg, tmp_path / "plain.jsonl", progress=False).path)
    vlm.image_memo.clear()
    towers: list[int] = []
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: towers.append(o[0].shape[0]))
    try:
        compare_clamped(vlm, sae, few, [{feature: 0.0}], tmp_path / "few", progress=False)
    finally:
        handle.remove()
    assert towers == [1] * (len({q.image for q in few}) + 1)  # each film and the blank, once for both models
    for name, alone in (("baseline", plain), ("clamp-0", fast)):
        shared = read_rows(tmp_path / "few" / name / "results.jsonl")
        assert [r["margin"] for r in shared] == [r["margin"] for r in alone]
    assert _no_hooks_left(vlm)


def test_cli_patch_and_clamp(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flipscope.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["patch", "--flipbank", str(BANK), "--features", "38", "--sweep", "36-39", "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    assert "mean recovery" in result.output and "non-flip controls" in result.output
    assert "matched control feature" in result.output and "each feature alone" in result.output
    assert (tmp_path / "p" / "patch.json").is_file() and (tmp_path / "p" / "sweep.jsonl").is_file()
    controls = json.loads((tmp_path / "p" / "patch.json").read_text())["summary"]["controls"]
    assert controls["wording_bound"]["n"] == controls["n"]  # every non-flip against its own wording
    assert wording_bound_reading(controls["wording_bound"]) in result.output
    small = ["--batch-size", "7", "--rows-per-forward", "10", "--out", str(tmp_path / "s"), "--no-wording-bound"]
    result = runner.invoke(app, ["patch", "--flipbank", str(BANK), "--features", "38", "--sweep", "36-39", *small])
    assert result.exit_code == 0, result.output
    for name in ("p", "s"):
        assert read_header(tmp_path / name / "sweep.jsonl")["cases_per_unit"] == (256 if name == "p" else 2)
    swept = [[r["m_patched"] for r in read_rows(tmp_path / name / "sweep.jsonl")] for name in ("p", "s")]
    np.testing.assert_allclose(*swept, atol=1e-4)
    assert "wording_bound" not in json.loads((tmp_path / "s" / "patch.json").read_text())["summary"]["controls"]
    patched = [json.loads((tmp_path / name / "patch.json").read_text())["cases"] for name in ("p", "s")]
    np.testing.assert_allclose(*([r["m_same_push"] for r in rows] for rows in patched), atol=1e-4)
    result = runner.invoke(app, ["patch", "--flipbank", str(BANK), "--features", "38,99"])
    assert result.exit_code == 2 and "feature index 99 is out of range" in result.output
    few = tmp_path / "q.jsonl"
    few.write_text("".join((BANK.parent / "questions.jsonl").read_text().splitlines(keepends=True)[:8]))
    result = runner.invoke(
        app,
        ["clamp", "--questions", str(few), "--images", str(BANK.parent), "--features", "38", "--values", "0,2",
         "--diffmean-from", str(BANK), "--out", str(tmp_path / "c")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "38=0" in result.output and "38=2" in result.output and "McNemar" in result.output
    assert "DiffMean ablated" in result.output
    result = runner.invoke(app, ["clamp", "--questions", str(few), "--features", "x", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--features 'x' is not a comma-separated list" in result.output


def test_diffmean_ablation_removes_the_direction_and_cuts_flips(setup, tmp_path: Path) -> None:
    from flipscope.data.questions import load_questions
    from flipscope.experiments.clamping import compare_interventions
    from flipscope.experiments.discovery import diffmean_direction
    from flipscope.interventions.edited import DirectionAblatedVLM

    vlm, sae, card, _, pairs = setup
    hook = card["hook_name"]
    direction = diffmean_direction(pairs, hook)
    ablated = DirectionAblatedVLM(vlm, hook, direction, name="diffmean")
    inputs = vlm.prompts.build([PromptSpec(question="Is the suspected opacity there?", condition="blank")] * 2)
    _, plain = vlm.run_with_cache(inputs, names_filter=[hook])
    _, cache = ablated.run_with_cache(inputs, names_filter=[hook])
    unit = direction / direction.norm()
    assert (plain[hook] @ unit).abs().max() > 1.0
    assert (cache[hook] @ unit).abs().max() < 1e-4
    # everything orthogonal to the direction is untouched
    torch.testing.assert_close(cache[hook] - plain[hook], -(plain[hook] @ unit)[..., None] * unit, atol=1e-4, rtol=0)
    assert ablated.identity()["ablate_direction"]["hook"] == hook and "ablate_direction" not in vlm.identity()

    questions = load_questions(BANK.parent / "questions.jsonl")
    report = compare_interventions(vlm, questions, {"diffmean": ablated}, tmp_path / "cmp", progress=False)
    paired = report["interventions"][0]["paired"]
    assert paired["flip_rate"]["relative_change"] <= -0.5 and paired["flip_rate"]["mcnemar_p"] < 0.01
    assert report["interventions"][0]["description"]["ablate_direction"]["name"] == "diffmean"
    assert _no_hooks_left(vlm)

    with pytest.raises(FlipscopeError, match=r"direction has shape \(3,\); expected \(128,\)"):
        DirectionAblatedVLM(vlm, hook, torch.ones(3))
    with pytest.raises(FlipscopeError, match="finite and nonzero"):
        DirectionAblatedVLM(vlm, hook, torch.zeros(128))
    with pytest.raises(FlipscopeError, match="'blocks.99.hook_resid_post' is not a hook point"):
        DirectionAblatedVLM(vlm, "blocks.99.hook_resid_post", direction)
    with pytest.raises(FlipscopeError, match="other than 'baseline'"):
        compare_interventions(vlm, questions, {"baseline": ablated}, tmp_path / "bad", progress=False)


def _cut_after_units(path: Path, n_units: int) -> None:
    """Keep the header and `n_units` finished units, then half of the next line (a run killed mid-write)."""
    lines = path.read_bytes().splitlines(keepends=True)
    markers = [i for i, line in enumerate(lines) if line.startswith(b'{"done"')]
    keep = lines[: markers[n_units - 1] + 1]
    path.write_bytes(b"".join(keep) + lines[len(keep)][: len(lines[len(keep)]) // 2])


def test_feature_and_layer_sweeps_resume_to_the_uninterrupted_store(setup, tmp_path: Path) -> None:
    vlm, sae, _, bank, pairs = setup
    few = {**bank, "flips": bank["flips"][:10], "controls": bank["controls"][:4]}
    sub = collect_pairs(vlm, few, list(pairs.orig), progress=False)
    runs = {
        "features": lambda path: patch_sweep(
            vlm, sae, few, [38, 3, 32], path, pairs=sub, rows_per_forward=9, progress=False
        ),
        "layers": lambda path: layer_sweep(vlm, few, path, pairs=sub, rows_per_forward=12, progress=False),
    }
    for name, run in runs.items():
        whole, cut = tmp_path / f"{name}-whole.jsonl", tmp_path / f"{name}-cut.jsonl"
        run(whole)
        assert whole.read_bytes().count(b'{"done"') == 5
        cut.write_bytes(whole.read_bytes())
        _cut_after_units(cut, 2)
        assert run(cut).done.keys() == run(whole).done.keys()
        assert cut.read_bytes() == whole.read_bytes()
    with pytest.raises(FlipscopeError, match="written by a different run"):
        patch_sweep(vlm, sae, few, [38, 3], tmp_path / "features-whole.jsonl", pairs=sub, progress=False)
