"""Which attention heads move the framing to the answer position, on the shipped organism: one head
of layer 0 is both enough and needed, all of a layer's heads restored equal its attention output
restored, the suffix path equals whole prompts, and the heads after the entry carry nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.flipbank import load_flipbank
from flipscope.data.questions import load_questions
from flipscope.errors import FlipscopeError
from flipscope.experiments.clamping import compare_interventions
from flipscope.experiments.evaluation import EvalConfig
from flipscope.experiments.heads import LOOKS, MIN_CARRIED, head_means, heads_before_entry, trace_heads
from flipscope.experiments.upstream import GROUPS, trace_framing
from flipscope.interventions.edited import HeadAblatedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism import OrganismConfig, load_organism
from flipscope.organism.questions import export_questions
from flipscope.reporting.claims import framing_heads, head_ablation
from flipscope.reporting.format import fmt

pytestmark = pytest.mark.costly(18)

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def organism():
    vlm, _, _ = load_organism()
    return vlm, load_flipbank(BANK)


@pytest.fixture(scope="module")
def heads(organism):
    vlm, bank = organism
    return trace_heads(vlm, bank, max_cases=32, progress=False)


def test_one_head_of_layer_0_carries_the_framing(heads) -> None:
    summary = heads.summary()
    assert summary["n_cases"] == 32 and summary["n_heads"] == 4 and summary["explained"]
    assert [(c["layer"], c["head"]) for c in summary["carriers"]] == [(0, 0)]
    carrier = summary["carriers"][0]
    assert carrier["restored"]["value"] >= 0.9 and carrier["removed"]["value"] >= 0.7
    others = heads.restored[:, 0, 1:].mean(0)
    assert np.abs(others).max() < 0.1  # the other heads of layer 0 bring back little alone
    later = summary["layers"][2:]  # past the entry the last position already holds it: no head moves it there
    shares = [abs(h[k]["value"]) for r in later for h in r["heads"] for k in ("restored", "removed")]
    assert max(shares) < 0.1
    sentence = framing_heads(summary)
    assert sentence.startswith("Head 0.0 carries the framing to the answer position")
    assert fmt(carrier["restored"]) in sentence and fmt(carrier["removed"]) in sentence


def test_all_of_layer_0s_heads_restore_what_its_attention_output_carries(organism, heads) -> None:
    """Layer 0's last position reads only its own embedding, which the corruption leaves alone, so
    restoring every head there is restoring layer 1's input at the last position (the trace's)."""
    vlm, bank = organism
    traced = trace_framing(vlm, bank, layers=[1], max_cases=32, progress=False)
    assert traced.case_ids == heads.case_ids
    np.testing.assert_allclose(heads.whole[:, 0], traced.restored[:, 0, GROUPS.index("last position")], atol=1e-4)


def test_the_suffix_path_equals_whole_prompts(organism) -> None:
    vlm, bank = organism
    fast = trace_heads(vlm, bank, layers=[0, 1], max_cases=16, progress=False)
    whole = trace_heads(vlm, bank, layers=[0, 1], max_cases=16, progress=False, fast=False)
    for got, want in [(fast.restored, whole.restored), (fast.removed, whole.removed), (fast.whole, whole.whole)]:
        np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(fast.looks, whole.looks)  # patterns are read on whole prompts either way


def test_the_carrier_looks_at_the_framing_words_and_a_head_that_does_not_is_not_said_to(organism, heads) -> None:
    """Head 0.0 puts more of its attention from the answer position on the framing words than any
    other head, and more than their share of the question's tokens; head 0.1, read as if it were
    the carrier, gets the opposite sentence from its own numbers."""
    np.testing.assert_allclose(heads.looks.sum(-1), 1.0, atol=1e-5)  # the four parts cover every real key
    vlm, bank = organism
    cases = [c for c in bank["flips"] if c["id"] in heads.case_ids]
    inputs = vlm.prompts.build([PromptSpec(question=c["paraphrase"], image=c["image"]) for c in cases])
    pattern = vlm.cache_activations(inputs, names_filter="blocks.0.attn.hook_pattern", positions="last")
    soft = inputs.token_type_ids.bool()  # the processor's own mark of the image soft tokens
    on_film = (pattern["blocks.0.attn.hook_pattern"] * soft[:, None]).sum(-1).numpy()
    np.testing.assert_allclose(heads.looks[:, 0, :, LOOKS.index("image")], on_film, atol=1e-6)
    summary = heads.summary()
    carrier = summary["carriers"][0]["looks"]
    others = [h["looks"]["framing words"]["high"] for r in summary["layers"] for h in r["heads"]][1:]
    assert carrier["framing words"]["low"] > max(others) and carrier["favours"]["low"] > 0
    sentence = framing_heads(summary)
    assert f"puts {fmt(carrier['framing words'])} of its attention on the framing words, more than any" in sentence
    assert f"it favours them beyond their share ({fmt(carrier['favours'])})" in sentence
    other = {"layer": 0, **summary["layers"][0]["heads"][1]}
    assert other["looks"]["favours"]["high"] < 0
    as_if = framing_heads({**summary, "carriers": [other]})
    assert "more than any other" not in as_if and "it gives them less than their share" in as_if


def test_heads_after_the_entry_are_not_named(organism) -> None:
    vlm, bank = organism
    summary = trace_heads(vlm, bank, layers=[2, 3], max_cases=16, progress=False).summary()
    assert summary["explained"] and summary["carriers"] == []
    assert framing_heads(summary).startswith("No traced layer's attention at the answer position brings back half")


def _summary(restored: list[float], removed: list[float], whole: float, *, n: int = 40, explained: bool = True):
    """A one-layer head summary with tight intervals around the given shares."""

    def ci(v: float) -> dict:
        return {"value": v, "low": v - 0.02, "high": v + 0.02, "n": n}

    heads = [
        {"head": h, "restored": ci(a), "removed": ci(b)} for h, (a, b) in enumerate(zip(restored, removed, strict=True))
    ]
    layers = [{"layer": 3, "all heads": ci(whole), "heads": heads}]
    carriers = [
        {"layer": 3, **h} for h in heads if h["restored"]["low"] >= MIN_CARRIED and h["removed"]["low"] >= MIN_CARRIED
    ]
    return {"n_cases": n, "explained": explained, "bar": MIN_CARRIED, "layers": layers, "carriers": carriers}


def test_each_reading_is_chosen_by_the_numbers() -> None:
    assert framing_heads(_summary([0.9, 0.1], [0.8, 0.0], 1.0)).startswith("Head 3.0 carries")
    both = framing_heads(_summary([0.9, 0.8], [0.7, 0.6], 1.0))
    assert both.startswith("Heads 3.0 and 3.1 carry") and "3.1: restoring it alone" in both
    redundant = framing_heads(_summary([0.9, 0.8], [0.2, 0.1], 1.0))
    assert redundant.startswith("No head both brings back and takes away half") and "other heads carry it" in redundant
    spread = framing_heads(_summary([0.3, 0.3], [0.2, 0.2], 0.9))
    assert spread.startswith("Layer 3's attention brings back 0.900") and "spread over its heads" in spread
    assert framing_heads(_summary([0.1, 0.0], [0.1, 0.0], 0.2)).startswith("No traced layer's attention")
    assert "no head is named" in framing_heads(_summary([0.9], [0.9], 1.0, explained=False))
    assert "(from only 6 flips)" in framing_heads(_summary([0.9, 0.1], [0.8, 0.0], 1.0, n=6))
    assert "nan" not in framing_heads({"n_cases": 0})


def test_an_unexplained_trace_traces_no_heads_unless_asked(organism) -> None:
    vlm, bank = organism
    unexplained = {"n_cases": 16, "explained": False, "entry_layer": None, "skipped": {}}
    summary = heads_before_entry(vlm, {}, unexplained)  # not a forward: the bank is not even read
    traced = trace_heads(vlm, bank, layers=[0], max_cases=4, progress=False).summary()
    assert summary.keys() == traced.keys()  # the same fields as a summary of traced heads
    assert summary["layers"] == [] and summary["carriers"] == [] and summary["n_heads"] == 4
    assert framing_heads(summary).endswith("so no head is named.")
    asked = heads_before_entry(vlm, bank, unexplained, [0], max_cases=16, progress=False)
    assert [row["layer"] for row in asked["layers"]] == [0] and asked["explained"]  # the bank's own words explain


def test_bad_layers_are_refused(organism) -> None:
    vlm, bank = organism
    with pytest.raises(FlipscopeError, match=r"layers \[7\]: the model has layers 0..3"):
        trace_heads(vlm, bank, layers=[0, 7], progress=False)
    with pytest.raises(FlipscopeError, match="no flips"):
        trace_heads(vlm, {**bank, "flips": []}, progress=False)


def test_the_trace_command_traces_heads_before_the_entry(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    args = ["trace", "--flipbank", str(BANK), "--max-cases", "16", "--heads", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["entry_layer"] == 1 and [r["layer"] for r in written["heads"]["layers"]] == [0]
    assert framing_heads(written["heads"]) in result.output
    first = written["heads"]["layers"][0]["heads"][0]
    assert f"{'0.0':>6}  {fmt(first['restored']):<28}{fmt(first['removed']):<28}" in result.output
    chosen = CliRunner().invoke(app, [*args[:-2], "--head-layers", "2,3", "--out", str(out)])
    assert chosen.exit_code == 0 and [r["layer"] for r in json.loads(out.read_text())["heads"]["layers"]] == [2, 3]
    bad = CliRunner().invoke(app, ["trace", "--flipbank", str(BANK), "--head-layers", "0"])
    assert bad.exit_code == 2 and "--head-layers needs --heads" in bad.output
    bad = CliRunner().invoke(app, ["trace", "--flipbank", str(BANK), "--heads", "--head-layers", "9"])
    assert bad.exit_code == 2 and "--head-layers [9]: the model has layers 0..3" in bad.output


@pytest.fixture(scope="module")
def switched_off(organism, tmp_path_factory: pytest.TempPathFactory):
    """The organism's held-out questions (20 films) evaluated as is and with each head of layer 0
    mean-ablated."""
    vlm, _ = organism
    root = tmp_path_factory.mktemp("heads")
    card = load_organism()[2]
    questions = load_questions(export_questions(OrganismConfig.from_dict(card["config"]), root / "q", n_films=20))
    means = head_means(vlm, questions, 0)
    models = {f"head 0.{h}": HeadAblatedVLM(vlm, 0, [h], means) for h in range(4)}
    report = compare_interventions(
        vlm, questions, models, root / "out", EvalConfig(conditions=("image",)), progress=False
    )
    return questions, means, report


def test_switching_off_the_carrier_removes_flips_at_an_accuracy_cost(switched_off) -> None:
    _, _, report = switched_off
    by_head = {e["description"]["ablate_heads"]["heads"][0]: e for e in report["interventions"]}
    assert by_head[0]["paired"]["flip_rate"]["change"]["high"] < 0  # the head the trace names
    assert all(by_head[h]["paired"]["flip_rate"]["change"]["high"] >= 0 for h in (1, 2, 3))  # the others: no cure
    reading = head_ablation(by_head[0])
    assert by_head[0]["paired"]["accuracy"]["change"]["high"] < 0 and "is no cure" in reading
    assert reading.startswith(" Switching off head 0.0 (its output replaced by its mean over the questions)")
    assert "do not fall beyond chance" in head_ablation(by_head[1])


def test_every_head_zeroed_is_the_attention_output_zeroed(organism, switched_off) -> None:
    """With no bias in `o_proj` and the post-attention norm of a zero vector zero, zeroing every
    head of layer 0 is zeroing what its attention adds to the residual stream."""
    vlm, _ = organism
    questions, means, _ = switched_off
    specs = [PromptSpec(question=q.question, image=q.image) for q in questions[:6]]
    inputs = vlm.prompts.build(specs)
    zeroed = HeadAblatedVLM(vlm, 0, [0, 1, 2, 3]).score(inputs)
    with vlm.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: torch.zeros_like(x))]):
        reference = vlm.score(inputs)
    torch.testing.assert_close(zeroed, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(HeadAblatedVLM(vlm, 0, [0], means).score(inputs), vlm.score(inputs), atol=1e-3)
    names = {json.dumps(HeadAblatedVLM(vlm, 0, heads, m).identity(), sort_keys=True, default=str)
             for heads, m in (([0], means), ([1], means), ([0], None))}  # fmt: skip
    assert len(names) == 3  # a store written under one ablation never resumes under another


def test_bad_head_ablations_are_refused(organism) -> None:
    vlm, _ = organism
    with pytest.raises(FlipscopeError, match=r"heads \[4\]: each layer has heads 0..3"):
        HeadAblatedVLM(vlm, 0, [4])
    with pytest.raises(FlipscopeError, match="layer 5: the model has layers 0..3"):
        HeadAblatedVLM(vlm, 5, [0])
    with pytest.raises(FlipscopeError, match=r"means has shape \(3,\); expected \(128,\)"):
        HeadAblatedVLM(vlm, 0, [0], torch.zeros(3))
    with pytest.raises(FlipscopeError, match="at least one question"):
        head_means(vlm, [], 0)


def test_each_head_ablation_reading_is_chosen_by_the_numbers() -> None:
    def entry(flips: tuple[float, float], accuracy: tuple[float, float], by: str = "mean") -> dict:
        def change(v: tuple[float, float]) -> dict:
            return {"change": {"value": sum(v) / 2, "low": v[0], "high": v[1], "n": 80}}

        description = {"ablate_heads": {"layer": 2, "heads": [1, 3], "by": by}}
        return {"description": description, "paired": {"flip_rate": change(flips), "accuracy": change(accuracy)}}

    cure = head_ablation(entry((-0.3, -0.1), (-0.02, 0.01)))
    assert "heads 2.1, 2.3 (each one's output replaced by its mean" in cure and cure.endswith(
        "these questions can detect."
    )
    assert "and are no cure" in head_ablation(entry((-0.3, -0.1), (-0.2, -0.05)))
    assert "do not fall beyond chance" in head_ablation(entry((-0.1, 0.02), (-0.2, -0.05), by="zero"))
    assert "(each one's output zeroed), which the trace says carry" in head_ablation(
        entry((-0.1, 0.02), (0, 0), by="zero")
    )


def test_the_clamp_command_refuses_a_head_that_is_not_layer_dot_head(tmp_path: Path) -> None:
    questions = BANK.with_name("questions.jsonl")
    args = ["clamp", "--questions", str(questions), "--features", "38", "--out", str(tmp_path / "c")]
    bad = CliRunner().invoke(app, [*args, "--ablate-heads", "0"])
    assert bad.exit_code == 2 and "--ablate-heads '0': each head is layer.head, e.g. 0.0 or 17.3" in bad.output
    bad = CliRunner().invoke(app, [*args, "--ablate-heads", "0.7"])
    assert bad.exit_code == 2 and "heads [7]: each layer has heads 0..3" in bad.output


def test_the_head_figure_stacks_each_heads_attention_to_one(heads) -> None:
    from flipscope.reporting.plots_sites import head_trace

    summary = heads.summary()
    fig = head_trace(summary)
    names = [f"{r['layer']}.{h['head']}" for r in summary["layers"] for h in r["heads"]]
    assert [t.name for t in fig.data] == ["restored alone", "removed alone", *LOOKS] and list(fig.data[0].x) == names
    top = np.array(fig.data[-1].base) + np.array(fig.data[-1].y)
    np.testing.assert_allclose(top, 1.0, atol=1e-5)
    with pytest.raises(FlipscopeError, match="no traced heads"):
        head_trace({"layers": []})
