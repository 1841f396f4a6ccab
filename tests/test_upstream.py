"""Where the framing enters, on the shipped organism: its 'leading' words carry the flip, the
corruption is exact where nothing was touched, and the last position takes the framing over after
the first layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.flipbank import load_flipbank
from flipscope.experiments.upstream import GROUPS, UpstreamTrace, _token_words, framing_words, trace_framing
from flipscope.organism import load_organism
from flipscope.reporting.format import fmt

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture(scope="module")
def traced(organism):
    vlm, _, _ = organism
    return trace_framing(vlm, load_flipbank(BANK), max_cases=16, progress=False)


def test_framing_words_are_the_paraphrases_own() -> None:
    assert framing_words("Is there an opacity?", "Is the suspected opacity there?") == ["the", "suspected"]
    assert framing_words("Is there X?", "Is there X, is there X?") == []


def test_tokens_map_to_their_words(organism) -> None:
    vlm, _, _ = organism
    text = "Can you confirm the suspected pleural effusion?"
    ids = vlm.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    owners = _token_words(vlm.processor.tokenizer, ids, text)
    assert len(owners) == len(ids)
    assert {w for w in owners if w} == {"can", "you", "confirm", "the", "suspected", "pleural", "effusion"}
    assert owners[-1] is None  # the question mark belongs to no word


def test_the_leading_words_carry_the_flip_and_enter_after_layer_0(traced) -> None:
    summary = traced.summary()
    assert summary["n_cases"] == 16 and sum(summary["skipped"].values()) == 0
    assert summary["corrupted_share"]["value"] >= 0.9  # the words the original lacks undo the flip
    framing, last = GROUPS.index("framing words"), GROUPS.index("last position")
    np.testing.assert_allclose(traced.restored[:, 0, framing], 1.0, atol=1e-4)  # layer 0 input: the clean run itself
    assert np.abs(traced.restored[:, 0, last]).max() < 0.05  # nothing has reached the last position yet
    assert traced.restored[:, -1, last].mean() >= 0.9 and traced.restored[:, -1, framing].mean() < 0.1
    assert summary["entry_layer"] == 1
    assert {"suspected", "the"} <= set(list(summary["words"])[:3])


def test_the_entry_is_a_layer_whose_every_flip_carries_it_not_a_mean() -> None:
    """A layer where half the flips' answer position carries the framing and half does not (mean
    0.55, a CI reaching far below half, as on a random checkpoint) is not named; the next layer,
    where all carry it, is."""
    rng = np.random.default_rng(0)
    n, last = 32, GROUPS.index("last position")
    restored = np.zeros((n, 3, len(GROUPS)))
    restored[:, 1, last] = np.where(np.arange(n) % 2 == 0, 1.1, 0.0) + rng.normal(0, 0.01, n)
    restored[:, 2, last] = 1.0 + rng.normal(0, 0.02, n)
    trace = UpstreamTrace(layers=[0, 1, 2], restored=restored, corrupted_share=np.full(n, 0.95),
                          effect=np.full(n, 3.0), words=[{} for _ in range(n)], case_ids=[str(i) for i in range(n)],
                          skipped={})  # fmt: skip
    assert restored[:, 1, last].mean() >= 0.5 and trace.summary()["profile"][1]["last position"]["low"] < 0.5
    assert trace.entry_layer() == 2 and trace.summary()["entry_site"] == "blocks.1.hook_attn_out"
    restored[:, 2, last] = restored[:, 1, last]  # no layer where every flip carries it: none named
    assert trace.entry_layer() is None and trace.summary()["entry_site"] is None


def test_trace_command_prints_where_the_framing_enters(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    result = CliRunner().invoke(app, ["trace", "--flipbank", str(BANK), "--max-cases", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 flips traced" in result.output and "the framing reaches the answer position" in result.output
    assert "(from only 4 cases)" in result.output and "nan" not in result.output
    written = json.loads(out.read_text())
    assert written["entry_layer"] == 1 and written["effect"]["value"] > 1  # the words move the margin by logits
    assert f"moves the margin by {fmt(written['effect'])} logits" in result.output
    assert written["entry_site"] == "blocks.0.hook_attn_out"
    site = "entry site: blocks.0.hook_attn_out at the answer position. An SAE there: flipscope sae train --hook "
    assert f"{site}blocks.0.hook_attn_out; then flipscope discover --sae auto --trace {out} picks it." in result.output
    sparse = CliRunner().invoke(app, ["trace", "--flipbank", str(BANK), "--max-cases", "4", "--layers", "0,2",
                                      "--out", str(tmp_path / "sparse.json")])  # fmt: skip
    assert sparse.exit_code == 0, sparse.output  # the entry lies somewhere before layer 2's input: said so
    assert "entry site: blocks.1.hook_attn_out at the answer position (the traced layers skip layer 1" in sparse.output
    bad = CliRunner().invoke(app, ["trace", "--flipbank", str(BANK), "--layers", "9"])
    assert bad.exit_code == 2 and "--layers [9]: the model has layers 0..3" in bad.output


def test_on_whole_prompts_the_trace_runs_the_tower_once_per_batch_not_per_forward(organism) -> None:
    """Where the trace runs whole prompts (a family without the suffix path), each film goes
    through the tower once for all its forwards, with the same shares."""
    vlm, _, _ = organism
    bank = load_flipbank(BANK)
    vlm.image_memo.clear()
    rows: list[int] = []
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
    try:
        once = trace_framing(vlm, bank, max_cases=8, batch_size=4, progress=False, fast=False)
        encodings = list(rows)
        rows.clear()
        each = trace_framing.__wrapped__(vlm, bank, max_cases=8, batch_size=4, progress=False, fast=False)
    finally:
        handle.remove()
    forwards = 2 * (2 + len(GROUPS) * vlm.n_layers)  # two batches: clean, corrupted, then one per layer and group
    films = len({case["image"] for case in bank["flips"] if case["id"] in once.case_ids})
    assert encodings == [1] * films and len(rows) >= forwards  # each film alone, once (the fill is text alone)
    np.testing.assert_allclose(once.restored, each.restored, atol=1e-4)
    np.testing.assert_allclose(once.corrupted_share, each.corrupted_share, atol=1e-5)
