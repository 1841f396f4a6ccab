"""The feature dashboard: its last-position and question shifts equal what the pairs and the
position encodings give by another path, its segments split each prompt where the wordings can
differ, its sentences follow the intervals (and say nothing moves where the two wordings are the
same), and the command writes its page and refuses a feature the SAE lacks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.flipbank import load_flipbank
from flipscope.errors import FlipscopeError
from flipscope.experiments.dashboard import feature_dashboard
from flipscope.experiments.feature_effects import _judged, feature_effects, removal_effects, write_effects
from flipscope.experiments.feature_logits import direct_logits
from flipscope.experiments.pairs import bank_cases, collect_pairs, pair_specs
from flipscope.experiments.readout import answer_direction
from flipscope.experiments.span_patch import tail_length
from flipscope.interventions.hooks import shift_features_hook
from flipscope.model.families import final_norm_gain
from flipscope.organism import load_organism
from flipscope.reporting.feature_claims import feature_sentence
from flipscope.sae.encode import encode_prompts
from flipscope.sae.load import check_sae, load_sae
from tests.test_sae import _raw_folder

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
ENTRY = Path(__file__).parents[1] / "flipscope" / "organism" / "default" / "sae_entry"
FRAMING, READOUT = 38, 32  # the organism's first framing feature, and a feature that writes "no"


@pytest.fixture(scope="module")
def setup():
    vlm, sae, card = load_organism()
    bank = load_flipbank(BANK)
    few = {**bank, "flips": bank["flips"][:24], "controls": bank["controls"][:12]}
    return vlm, sae, card, few, feature_dashboard(vlm, sae, few, [FRAMING, READOUT], progress=False)


def test_the_shifts_equal_the_pairs_and_the_position_encodings(setup) -> None:
    vlm, sae, card, few, found = setup
    pairs = collect_pairs(vlm, few, [card["hook_name"]], progress=False)
    delta = pairs.feature_delta(sae, card["hook_name"]).double().numpy()
    for f in (FRAMING, READOUT):
        shift = found["features"][str(f)]["shift"]
        for who, mask in (("flips", pairs.is_flip), ("controls", ~pairs.is_flip)):
            assert shift["last position"][who]["value"] == pytest.approx(delta[mask, f].mean(), abs=1e-4)
            assert shift["last position"][who]["n"] == int(mask.sum())
    specs, orig, para = pair_specs(pairs.cases)
    encoded = encode_prompts(vlm, sae, specs, positions="question")
    question = (encoded.features[..., FRAMING].sum(1) / encoded.mask.sum(1)).double().numpy()
    by_case = question[para] - question[orig]
    got = found["features"][str(FRAMING)]["shift"]["question"]["flips"]["value"]
    assert got == pytest.approx(by_case[pairs.is_flip].mean(), abs=1e-4)


def test_each_batch_runs_its_films_prompt_parts_before_the_questions_once(setup) -> None:
    """58 prompts on 15 films in batches of 8: with each film's prompts side by side, at most
    8 + 15 - 1 prefixes run (in the bank's order, 35 would); the layer after the hook runs nothing."""
    vlm, sae, card, few, found = setup
    specs = pair_specs(bank_cases(few)[0])[0]
    films, batches = len({str(s.image) for s in specs}), -(-len(specs) // 8)
    counted: list[int] = []
    layers = vlm.hf_model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(lambda m, a, k, i=i: counted.append((i, a[0].shape[:2] if a else
               k["hidden_states"].shape[:2])), with_kwargs=True) for i in range(len(layers))]  # fmt: skip
    try:
        grouped = feature_dashboard(
            vlm, sae, few, [FRAMING, READOUT], batch_size=8, logits=0, effects=0, progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    layer = int(card["hook_name"].split(".")[1])
    assert not [c for c in counted if c[0] > layer]  # both forwards end at the hook
    forwards = [shape for i, shape in counted if i == 0]
    prefixes = [shape for shape in forwards if shape[1] > 20]  # the prefix (header, 16 image tokens) is the long one
    assert len(forwards) == len(prefixes) + batches  # a prefix forward and a suffix forward each batch
    assert sum(shape[0] for shape in prefixes) <= batches + films - 1 < 35
    for f in (FRAMING, READOUT):  # batches of 8 in another order read the same numbers as batches of 16
        for place, moved in grouped["features"][str(f)]["shift"].items():
            for who, value in moved.items():
                assert value == pytest.approx(found["features"][str(f)]["shift"][place][who], abs=1e-5)


def test_segments_split_a_prompt_where_the_wordings_can_differ(setup) -> None:
    vlm, sae, _, few, _ = setup
    one = {**few, "flips": few["flips"][:1], "controls": []}
    shown = feature_dashboard(vlm, sae, one, [FRAMING], progress=False)["features"][str(FRAMING)]
    seg = shown["segments"]
    original, paraphrase = seg["originals"], seg["paraphrases"]
    assert original["n_prompts"] == paraphrase["n_prompts"] == 1
    for same in ("image", "before question", "tail"):  # the film and the template: as many tokens in both
        assert original[same]["n"] == paraphrase[same]["n"] > 0
    for same in ("image", "before question"):  # and, before the question, the same activations
        assert original[same]["mean"] == pytest.approx(paraphrase[same]["mean"], abs=1e-5)
    assert original["question"]["n"] != paraphrase["question"]["n"]  # the wordings differ in length
    assert original["last position"]["n"] == 1 and shown["density"] > 0


def test_top_activations_are_the_questions_and_tails_largest(setup) -> None:
    _, _, _, _, found = setup
    for f in (FRAMING, READOUT):
        top = found["features"][str(f)]["top"]
        values = [r["activation"] for r in top]
        assert values == sorted(values, reverse=True) and len(top) == 12 and values[-1] > 0
        assert all(r["segment"] in ("question", "tail") for r in top)
        assert all(r["segment"] == "tail" for r in top if r["last"])
    strip = found["features"][str(FRAMING)]["examples"][0]
    assert strip["paraphrase"][-1][1] == max(
        e["paraphrase"][-1][1] for e in found["features"][str(FRAMING)]["examples"]
    )


def test_the_sentences_follow_the_intervals_and_a_bank_of_identical_wordings_moves_nothing(setup) -> None:
    vlm, sae, _, few, found = setup
    framing = feature_sentence(str(FRAMING), found["features"][str(FRAMING)])
    readout = feature_sentence(str(READOUT), found["features"][str(READOUT)])
    assert "at the last position, where the answer is read, the paraphrase raises it" in framing
    assert "at the last position, where the answer is read, the paraphrase lowers it" in readout
    same = copy.deepcopy(few)
    for case in [*same["flips"], *same["controls"]]:
        case["paraphrase"] = case["original"]
    null = feature_dashboard(vlm, sae, same, [FRAMING], progress=False)["features"][str(FRAMING)]
    assert null["shift"]["last position"]["flips"]["value"] == 0.0
    said = feature_sentence(str(FRAMING), null)
    assert said.count("no change, as the interval stands") == 2 and "nan" not in said
    silent = copy.deepcopy(sae)
    with torch.no_grad():
        silent.threshold[FRAMING] = 1e9
    dead = feature_dashboard(vlm, silent, few, [FRAMING], progress=False)["features"][str(FRAMING)]
    assert feature_sentence(str(FRAMING), dead) == f"Feature {FRAMING} does not fire on the bank's prompts."
    assert dead["top"] == [] and dead["tokens"] == [] and dead["density"] == 0.0
    assert dead["effect"]["effect"] is None and not dead["effect"]["moves"]


def test_what_a_feature_writes_is_its_decoder_row_through_the_unembedding(setup) -> None:
    vlm, sae, _, few, found = setup
    w_u = vlm.hf_model.get_output_embeddings().weight.detach().float()
    gain = final_norm_gain(vlm.hf_model.model.language_model.norm)
    decode = vlm.prompts.tokenizer.decode
    for f in (FRAMING, READOUT):
        writes = found["features"][str(f)]["writes"]
        logits = (sae.W_dec[f].detach().float() * gain) @ w_u.T  # the whole vocabulary at once
        for key, descending in (("raises", True), ("lowers", False)):
            order = logits.argsort(descending=descending)[:10]
            assert [t for t, _ in writes[key]] == [decode([int(i)]) for i in order]
            np.testing.assert_allclose([v for _, v in writes[key]], logits[order].numpy(), atol=1e-5)
    blocked, whole = (
        direct_logits(vlm, sae, [FRAMING, READOUT], 10, block=7),
        direct_logits(vlm, sae, [FRAMING, READOUT], 10),
    )
    for a, b in zip(blocked, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    readout = found["features"][str(READOUT)]["writes"]
    assert readout["raises"][0][0] == "no" and readout["lowers"][0][0] == "yes"
    assert "its decoder row writes no (answer alignment -0.7" in feature_sentence(
        str(READOUT), found["features"][str(READOUT)]
    )
    scrambled = copy.deepcopy(sae)  # the same feature, its decoder row a random direction of the same norm
    with torch.no_grad():
        row = torch.randn(sae.W_dec.shape[1], generator=torch.Generator().manual_seed(0))
        scrambled.W_dec[READOUT] = row / row.norm() * sae.W_dec[READOUT].norm()
    random = feature_dashboard(vlm, scrambled, few, [READOUT], progress=False)["features"][str(READOUT)]
    assert abs(random["writes"]["answer_alignment"]) < random["writes"]["null"]
    assert "its decoder row does not point at the answer" in feature_sentence(str(READOUT), random)
    assert not random["effect"]["moves"] and abs(random["effect"]["effect"]["value"]) < random["effect"]["null"]
    assert not random["removal"]["moves"]
    assert "no more than random directions of its norm do" in feature_sentence(str(READOUT), random)


def test_writing_a_feature_at_the_answer_position_moves_the_margin_as_full_forwards_do(setup) -> None:
    """The measured effect is half the difference of two full forwards, the row added and
    subtracted at the last position (at a residual hook and at the heads' outputs); the feature
    whose row writes "no" moves the margin toward no beyond 16 random directions of its norm."""
    vlm, sae, card, few, found = setup
    specs = pair_specs(bank_cases(few)[0])[0][:5]
    writes = torch.randn(2, vlm.d_model, generator=torch.Generator().manual_seed(1)) * 3
    for hook in (card["hook_name"], "blocks.0.attn.hook_z"):
        got = write_effects(vlm, specs, hook, writes)
        for k, w in enumerate(writes):
            moved = []
            for sign in (1, -1):

                def add(x, hook, w=w * sign):
                    x = x.clone()
                    x[:, -1] += w
                    return x

                with vlm.hooks(fwd_hooks=[(hook, add)]):
                    moved.append(vlm.score(vlm.prompts.build(specs)).double().numpy())
            np.testing.assert_allclose(got[:, k], (moved[0] - moved[1]) / 2, atol=1e-4)
            assert np.abs(got[:, k]).max() > 0.01  # the writes move the margin at both hooks
    rows: list[int] = []  # 4 variants a prompt, at most 3 rows a forward: each prompt's variants in two slices
    layer = vlm.hf_model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: rows.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
    )
    try:
        sliced = write_effects(vlm, specs, card["hook_name"], writes, rows_per_forward=3)
    finally:
        handle.remove()
    np.testing.assert_allclose(sliced, write_effects(vlm, specs, card["hook_name"], writes), atol=1e-5)
    vlm.image_memo.clear()
    towers: list[int] = []  # as full forwards, 4 rows a prompt: still each film through the tower once
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: towers.append(o[0].shape[0]))
    try:
        whole = write_effects(vlm, specs, card["hook_name"], writes, fast=False)
    finally:
        handle.remove()
    np.testing.assert_allclose(whole, sliced, atol=1e-4)
    assert sum(towers) == len({str(spec.image) for spec in specs})
    # the first slice (3 variants) one prompt a forward, the second (1 variant) three; each a prefix, then the writes
    assert max(rows) <= 3 and len(rows) == 2 * (len(specs) + -(-len(specs) // 3))
    effect = found["features"][str(READOUT)]["effect"]
    assert effect["moves"] and effect["effect"]["high"] < 0 and effect["effect"]["n"] == 16
    assert effect["scale"] == pytest.approx(max(float(p["activation"]) for p in found["features"][str(READOUT)]["top"]))
    said = feature_sentence(str(READOUT), found["features"][str(READOUT)])
    assert "it moves the margin toward no by" in said and "as its direct reading says" in said
    turned = copy.deepcopy(found["features"][str(READOUT)])
    turned["writes"]["answer_alignment"] *= -1  # a direct reading of yes that the measured effect contradicts
    assert "the opposite of its direct reading" in feature_sentence(str(READOUT), turned)
    turned["writes"]["answer_alignment"] = 0.0
    assert "the layers after the hook carry it there" in feature_sentence(str(READOUT), turned)
    framing = found["features"][str(FRAMING)]
    assert framing["removal"]["moves"] and framing["removal"]["effect"]["high"] < 0
    assert "where it fires it pushes the answer toward yes" in feature_sentence(str(FRAMING), framing)
    turned["effect"] = _judged(np.array([0.5, np.inf]), np.zeros((2, 16)), 3.0, 16)  # a margin that is no number
    said = feature_sentence(str(READOUT), turned)
    assert turned["effect"]["effect"] is None and "its margins are not finite numbers" in said
    assert "nan" not in said and "inf" not in said
    with pytest.raises(FlipscopeError, match="feature index 64 is out of range"):
        removal_effects(vlm, sae, card["hook_name"], [64], specs)
    with pytest.raises(FlipscopeError, match="1 scales for 2 features"):
        feature_effects(vlm, sae, card["hook_name"], [FRAMING, READOUT], [1.0], specs)


def test_an_sae_on_the_heads_outputs_is_read_through_the_output_projection(tmp_path: Path, setup) -> None:
    """GemmaScope 2's attention SAEs read the heads' outputs (`attn.hook_z`): a row solved so that
    the output projection and the post-attention norm's gain carry it onto the answer direction
    is said to write yes, and one they carry orthogonal to it is not."""
    vlm, _, _, few, _ = setup
    heads = load_sae(_raw_folder(tmp_path, layer=0, d_in=vlm.d_model, site="attn_out")[0])  # blocks.0.attn.hook_z
    layer = vlm.hf_model.model.language_model.layers[0]
    w_o = layer.self_attn.o_proj.weight.detach().float()
    gain = final_norm_gain(layer.post_attention_layernorm)
    target = answer_direction(vlm) / gain
    away = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0))
    away -= (away @ answer_direction(vlm)) * answer_direction(vlm)  # a write orthogonal to the answer
    with torch.no_grad():
        heads.W_dec[1] = torch.linalg.lstsq(w_o, target[:, None]).solution[:, 0]
        heads.W_dec[0] = torch.linalg.lstsq(
            w_o, (away / final_norm_gain(layer.post_attention_layernorm))[:, None]
        ).solution[:, 0]
    one = {**few, "flips": few["flips"][:2], "controls": []}
    found = feature_dashboard(vlm, heads, one, [0, 1], progress=False)
    assert found["meta"]["hook"] == "blocks.0.attn.hook_z"
    solved, orthogonal = found["features"]["1"]["writes"], found["features"]["0"]["writes"]
    assert solved["answer_alignment"] > 0.99 and abs(orthogonal["answer_alignment"]) < 1e-3
    assert "its decoder row writes yes" in feature_sentence("1", found["features"]["1"])
    assert "does not point at the answer" in feature_sentence("0", found["features"]["0"])


def test_the_command_writes_the_page_and_refuses_a_feature_the_sae_lacks(tmp_path: Path) -> None:
    out = tmp_path / "dash"
    result = CliRunner().invoke(app, ["dashboard", "--flipbank", str(BANK), "--features", f"{FRAMING}", "--top", "5",
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    found = json.loads((out / "dashboard.json").read_text())
    assert list(found["features"]) == [str(FRAMING)] and len(found["features"][str(FRAMING)]["top"]) == 5
    page = (out / "dashboard.html").read_text()
    assert f"Feature {FRAMING}" in page and "<mark>" in page and "nan" not in result.output
    assert f"Feature {FRAMING} (active at" in result.output
    assert "read directly through the unembedding" in page and "decoder row" in result.output
    assert "What writing it at the answer position does" in page and "Written at the answer position" in result.output
    bare = CliRunner().invoke(app, ["dashboard", "--flipbank", str(BANK), "--features", f"{READOUT}", "--logits", "0",
                                    "--effects", "0", "--out", str(tmp_path / "bare")])  # fmt: skip
    assert bare.exit_code == 0, bare.output
    shown = json.loads((tmp_path / "bare" / "dashboard.json").read_text())["features"][str(READOUT)]
    assert "writes" not in shown and "effect" not in shown
    assert "decoder row" not in bare.output and "Written at" not in bare.output
    bad = CliRunner().invoke(
        app, ["dashboard", "--flipbank", str(BANK), "--features", "64", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 2 and "feature index 64 is out of range" in bad.output
    assert not (tmp_path / "b" / "dashboard.json").exists()


def test_switching_a_feature_off_where_the_wordings_differ_moves_the_margin_as_full_forwards_do(setup) -> None:
    """The removal equals whole-prompt forwards with x − f(x)·row on the question's and the tail's
    positions (the SAE's error term kept), at the SAE's layer and at the entry's attention."""
    vlm, sae, card, few, _ = setup
    entry = load_sae(ENTRY)
    specs = pair_specs(bank_cases(few)[0])[0][:6]
    inputs = vlm.prompts.build(specs)
    where = vlm.prompts.question_mask(specs, inputs)
    where[:, inputs.input_ids.shape[1] - tail_length(vlm) :] = True
    base = vlm.score(inputs).double().numpy()
    for dictionary, feature in ((sae, FRAMING), (entry, 62)):
        hook = check_sae(dictionary, vlm)
        got = removal_effects(vlm, dictionary, hook, [feature], specs, batch_size=4)[str(feature)]
        with vlm.hooks(fwd_hooks=[(hook, shift_features_hook(dictionary, [feature], torch.zeros(1), where))]):
            removed = vlm.score(inputs).double().numpy() - base
        assert got["effect"]["value"] == pytest.approx(removed.mean(), abs=1e-4)
        assert abs(removed.mean()) > 0.05 and got["effect"]["n"] == len(specs)
