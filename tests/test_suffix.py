"""Suffix runs (`flipscope.model.suffix`): one batch's prompts before the questions run once, every
forward after it on the questions alone; margins, caches and edits equal the whole-prompt
forwards, and the trace they serve equals the trace on whole prompts at a fraction of the tokens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.data.flipbank import load_flipbank
from flipscope.errors import FlipscopeError
from flipscope.experiments.pairs import case_spec, collect_pairs
from flipscope.experiments.upstream import framing_word_shifts, trace_framing
from flipscope.model.prompts import PromptSpec
from flipscope.model.suffix import FullRuns, SuffixReads, SuffixRuns, batch_runs, prompt_activations
from flipscope.organism import load_organism

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def organism():
    return load_organism()[0]


@contextmanager
def counting(vlm) -> Iterator[dict[str, list[int]]]:
    """Tokens of each language-model forward and images of each tower forward inside the block
    (from an empty image memo: every film is new to it)."""
    vlm.image_memo.clear()
    counted: dict[str, list[int]] = {"tokens": [], "tower": []}
    handles = [
        vlm.hf_model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: counted["tokens"].append(k["inputs_embeds"].shape[:2].numel()), with_kwargs=True
        ),
        vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: counted["tower"].append(o[0].shape[0])),
    ]
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()


def _push(vector: torch.Tensor, mask: torch.Tensor):
    def hook(x: torch.Tensor, hook) -> torch.Tensor:
        return x + mask[..., None].to(x) * vector.to(x)

    return hook


def test_suffix_runs_equal_whole_prompts_with_and_without_an_edit(organism) -> None:
    vlm = organism
    cases = load_flipbank(BANK)["flips"][:6]
    specs = [case_spec(c, c["paraphrase"]) for c in cases]
    inputs = vlm.prompts.build(specs)
    question = vlm.prompts.question_mask(specs, inputs)
    assert bool((inputs.attention_mask == 0).any())  # rows of different lengths: left padding to undo
    runs, full = batch_runs(vlm, inputs, question), FullRuns(vlm, inputs)
    assert isinstance(runs, SuffixRuns)
    first = int(question[0].int().argmax()) - int((inputs.attention_mask[0] == 0).sum())
    assert runs.cut == first and runs.input_ids.shape[1] < inputs.input_ids.shape[1] / 2
    margin, cache = runs.run_with_cache([HOOK])
    margin_full, cache_full = full.run_with_cache([HOOK])
    torch.testing.assert_close(margin, margin_full, atol=1e-4, rtol=0)
    keep = runs.keep
    torch.testing.assert_close(cache[HOOK][keep], runs.to_run(cache_full[HOOK])[keep], atol=1e-4, rtol=1e-4)
    push = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0)) * 3
    edited_full = full.margins([(HOOK, _push(push, question))])
    edited = runs.margins([(HOOK, _push(push, runs.to_run(question)))])
    assert float((edited_full - margin_full).abs().max()) > 0.1  # the edit moves the margin
    torch.testing.assert_close(edited, edited_full, atol=1e-4, rtol=0)
    with pytest.raises(FlipscopeError, match=f"before the cut at {runs.cut}"):
        runs.to_run(inputs.attention_mask.bool())


def test_batches_without_one_shared_prefix_run_whole_prompts(organism) -> None:
    vlm = organism
    case = load_flipbank(BANK)["flips"][0]
    mixed = [case_spec(case, case["paraphrase"]), PromptSpec(question=case["paraphrase"], condition="none")]
    inputs = vlm.prompts.build(mixed)
    assert type(batch_runs(vlm, inputs, vlm.prompts.question_mask(mixed, inputs))) is FullRuns
    one = [case_spec(case, case["paraphrase"])]
    inputs = vlm.prompts.build(one)
    assert type(batch_runs(vlm, inputs, torch.zeros_like(inputs.attention_mask, dtype=torch.bool))) is FullRuns


def test_the_trace_on_suffixes_equals_it_on_whole_prompts_for_a_fraction_of_the_tokens(organism) -> None:
    vlm = organism
    bank = load_flipbank(BANK)
    with counting(vlm) as counted:
        fast = trace_framing(vlm, bank, max_cases=8, batch_size=4, progress=False)
    with counting(vlm) as whole_counted:
        whole = trace_framing(vlm, bank, max_cases=8, batch_size=4, progress=False, fast=False)
    assert fast.case_ids == whole.case_ids and len(fast.case_ids) == 8
    np.testing.assert_allclose(fast.restored, whole.restored, atol=1e-4)
    np.testing.assert_allclose(fast.corrupted_share, whole.corrupted_share, atol=1e-5)
    for a, b in zip(fast.words, whole.words, strict=True):
        assert list(a) == list(b) and np.allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert fast.entry_layer() == whole.entry_layer()
    films = len({case["image"] for case in bank["flips"] if case["id"] in fast.case_ids})
    assert counted["tower"] == whole_counted["tower"] == [1] * films  # each film once (the fill needs none)
    assert sum(counted["tokens"]) < sum(whole_counted["tokens"]) / 2  # 16 image tokens; MedGemma's 256: ~8x


def test_the_wording_bound_on_suffixes_equals_it_on_whole_prompts(organism) -> None:
    vlm = organism
    bank = load_flipbank(BANK)
    bank = {**bank, "controls": bank["controls"][:10]}
    fast = framing_word_shifts(vlm, bank)
    whole = framing_word_shifts(vlm, bank, fast=False)
    assert list(fast) == list(whole) and len(fast) == 10
    np.testing.assert_allclose(list(fast.values()), list(whole.values()), atol=1e-4)


def test_the_pairs_run_each_films_prompts_before_the_questions_once(organism) -> None:
    vlm = organism
    bank = load_flipbank(BANK)
    bank = {**bank, "flips": bank["flips"][:24], "controls": bank["controls"][:12]}
    hooks = [HOOK, "blocks.2.hook_resid_post"]
    with counting(vlm) as fast_counted:
        fast = collect_pairs(vlm, bank, hooks, batch_size=16, progress=False)
    with counting(vlm) as whole_counted:
        whole = collect_pairs(vlm, bank, hooks, batch_size=16, fast=False, progress=False)
    torch.testing.assert_close(fast.margin_orig, whole.margin_orig, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.margin_para, whole.margin_para, atol=1e-4, rtol=0)
    for hook in hooks:
        torch.testing.assert_close(fast.orig[hook], whole.orig[hook], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.para[hook], whole.para[hook], atol=1e-4, rtol=1e-4)
    films = len({c["image"] for c in [*bank["flips"], *bank["controls"]]})
    assert fast_counted["tower"] == whole_counted["tower"] == [1] * films  # each film once, for all its prompts
    prompts = whole_counted["tokens"]  # one forward a batch; 16 image tokens here, MedGemma's 256 save far more
    assert sum(fast_counted["tokens"]) < 0.6 * sum(prompts) and len(fast_counted["tokens"]) == 2 * len(prompts)


def _layer_tokens(vlm) -> tuple[list, list[int]]:
    """Handles of hooks that count the tokens each decoder layer runs, and the counts."""
    counts = [0] * vlm.n_layers
    layers = vlm.hf_model.model.language_model.layers

    def counter(i: int):
        def count(module, args, kwargs) -> None:
            counts[i] += int(args[0].shape[:2].numel() if args else kwargs["hidden_states"].shape[:2].numel())

        return count

    return [layer.register_forward_pre_hook(counter(i), with_kwargs=True) for i, layer in enumerate(layers)], counts


def test_prompt_activations_read_each_films_prefix_once_and_stop_at_the_hook(organism) -> None:
    vlm = organism
    cases = load_flipbank(BANK)["flips"][:8]
    specs = [case_spec(c, text) for c in cases for text in (c["original"], c["paraphrase"])]
    films = len({c["image"] for c in cases})
    last = vlm.n_layers - 1
    for layer, hook in ((0, "blocks.0.hook_attn_out"), (last, f"blocks.{last}.hook_resid_post")):
        ran = {}
        for fast in (True, False):
            handles, counts = _layer_tokens(vlm)
            try:
                inputs, ran[fast] = prompt_activations(vlm, specs, [hook], fast=fast)
            finally:
                for handle in handles:
                    handle.remove()
            ran[fast, "counts"] = counts
        real = inputs.attention_mask.bool()
        assert bool((~real).any())  # rows of different lengths: left padding
        torch.testing.assert_close(ran[True][hook][real], ran[False][hook][real], atol=1e-4, rtol=1e-4)
        assert float(ran[True][hook][~real].abs().max()) == 0.0
        fast_counts, whole_counts = ran[True, "counts"], ran[False, "counts"]
        assert fast_counts[layer + 1 :] == whole_counts[layer + 1 :] == [0] * (vlm.n_layers - layer - 1)  # both stop
        prefix = vlm.prompts.question_mask(specs, inputs).int().argmax(1) - (~real).sum(1)
        suffix = real.sum(1) - prefix
        assert fast_counts[layer] == films * int(prefix.min()) + len(specs) * int(suffix.max())  # a prefix per film
        assert whole_counts[layer] == inputs.input_ids.numel()
    batch = vlm.prompts.build(specs)
    reads = SuffixReads(vlm, batch, int(prefix.min()), ["blocks.0.hook_attn_out"])
    with pytest.raises(FlipscopeError, match="give no margins"):
        reads.margins()
