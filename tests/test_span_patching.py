"""Span patching: over the question each feature goes to the original's mean over its question,
over the template's tail to the original's own values there, so `"all"` holds the last position's
delta patch; before the question nothing moves, since the two prompts are the same there."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.data.flipbank import load_flipbank
from flipscope.data.store import read_rows
from flipscope.experiments.pairs import collect_pairs, pair_specs
from flipscope.experiments.patching import POSITIONS, patch_bank
from flipscope.experiments.span_patch import SpanReference, span_targets
from flipscope.experiments.sweeps import layer_sweep
from flipscope.organism import load_organism

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


@pytest.fixture(scope="module")
def setup():
    vlm, sae, card = load_organism()
    bank = load_flipbank(BANK)
    few = {**bank, "flips": bank["flips"][:12], "controls": bank["controls"][:4]}
    return vlm, sae, card, few


def _margins(result, key: str = "m_patched") -> np.ndarray:
    return np.array([row[key] for row in result.rows])


def test_targets_follow_the_question_mean_and_the_tail_values() -> None:
    question = torch.zeros(2, 7, dtype=torch.bool)
    question[0, 2:5] = question[1, 4] = True  # two questions right before a tail of two
    reference = SpanReference(torch.tensor([[1.0], [2.0]]), torch.tensor([[[5.0], [6.0]], [[7.0], [8.0]]]))
    target, mask = span_targets(reference, question, "question")
    assert torch.equal(mask, question) and torch.equal(target[0, 2:5, 0], torch.ones(3)) and target[1, 4, 0] == 2.0
    target, mask = span_targets(reference, question, "all")
    assert mask.tolist() == [[False] * 2 + [True] * 5, [False] * 4 + [True] * 3]  # nothing before the question
    assert target[0, 5:, 0].tolist() == [5.0, 6.0] and target[1, 5:, 0].tolist() == [7.0, 8.0]
    assert target[0, 2:5, 0].tolist() == [1.0] * 3 and target[1, 4, 0] == 2.0


def test_an_original_and_its_paraphrase_agree_before_the_question(setup) -> None:
    vlm, _, card, few = setup
    specs, orig, para = pair_specs(few["flips"][:1])
    hook = card["hook_name"]
    acts = [vlm.cache_activations(vlm.prompts.build([specs[i[0]]]), names_filter=hook)[hook][0] for i in (orig, para)]
    built = vlm.prompts.build([specs[orig[0]]])
    n_before = int(vlm.prompts.question_mask([specs[orig[0]]], built)[0].nonzero()[0, 0])  # header and image block
    assert n_before > 1
    torch.testing.assert_close(acts[0][:n_before], acts[1][:n_before], rtol=1e-5, atol=1e-5)
    assert (acts[0][-1] - acts[1][-1]).abs().max() > 1e-3  # where the framing has reached, they differ


def test_at_the_last_layer_all_equals_last_and_the_question_moves_nothing(setup) -> None:
    vlm, sae, card, few = setup
    last = copy.deepcopy(sae)
    hook = f"blocks.{vlm.n_layers - 1}.hook_resid_post"  # the margin reads only its last position there
    last.cfg.metadata.hook_name = hook
    pairs = collect_pairs(vlm, few, [hook], progress=False)
    features = [f["feature"] for f in card["framing_features"]]
    runs = {p: patch_bank(vlm, last, few, features, positions=p, pairs=pairs, control_features=None, progress=False)
            for p in POSITIONS}  # fmt: skip
    para = _margins(runs["last"], "m_para")
    assert np.abs(_margins(runs["last"]) - para).max() > 0.05  # the features fire there and the patch moves margins
    np.testing.assert_allclose(_margins(runs["all"]), _margins(runs["last"]), atol=1e-4)
    np.testing.assert_allclose(_margins(runs["question"]), para, atol=1e-4)


def test_span_patches_do_not_depend_on_the_batch_and_all_holds_the_last_position(setup) -> None:
    vlm, sae, card, few = setup
    features = [f["feature"] for f in card["framing_features"]]
    pairs = collect_pairs(vlm, few, [card["hook_name"]], progress=False)
    kw = {"pairs": pairs, "control_features": None, "progress": False}
    for span in ("question", "all"):
        one, many = (_margins(patch_bank(vlm, sae, few, features, positions=span, batch_size=b, **kw)) for b in (1, 5))
        np.testing.assert_allclose(one, many, atol=1e-5)
    flips = lambda r: r.summary["flips"]["mean_recovery"]["value"]  # noqa: E731
    last, every = (flips(patch_bank(vlm, sae, few, features, positions=p, **kw)) for p in ("last", "all"))
    assert every >= last - 0.02 and last > 0.1


def test_original_value_patching_equals_the_layer_sweep_at_the_saes_layer(setup, tmp_path: Path) -> None:
    vlm, sae, card, few = setup
    layer = int(card["hook_name"].split(".")[1])
    pairs = collect_pairs(vlm, few, [card["hook_name"]], progress=False)
    result = patch_bank(vlm, sae, few, None, variant="original", pairs=pairs, progress=False)
    assert result.summary["setup"]["variant"] == "original" and "matched_control_feature" not in result.summary
    store = layer_sweep(vlm, few, tmp_path / "layers.jsonl", layers=[layer], pairs=pairs, progress=False)
    swept = read_rows(store.path)
    by_case = {(r["case"], r["kind"]): r["m_patched"] for r in swept}
    np.testing.assert_allclose(_margins(result), [by_case[(r["case"], r["kind"])] for r in result.rows], atol=1e-4)
    assert result.summary["flips"]["mean_recovery"]["value"] > 0.9  # by layer 2 the answer position holds the framing
