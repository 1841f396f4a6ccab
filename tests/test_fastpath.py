"""The shared-prefix path equals the naive per-prompt forward (margins within 1e-4, same answers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flipscope.data.questions import load_questions
from flipscope.data.store import read_header, read_rows
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.answers import yes_no_margin
from flipscope.model.kv import score_shared_prefix
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions

QUESTIONS = (
    "Is there an effusion?",
    "Do you see any pleural effusion in this film?",
    "Are the lungs clear?",
    "Is there any opacity in the lungs?",
)


def _naive(vlm: HookedVLM, specs: list[PromptSpec]) -> torch.Tensor:
    with torch.no_grad():
        logits = [vlm.hf_model(**vlm.prompts.encode(spec)).logits[:, -1] for spec in specs]
    return yes_no_margin(torch.cat(logits), vlm.answer_tokens)


@pytest.mark.parametrize("condition", ["image", "blank", "none"])
def test_equals_naive_with_a_window_shorter_than_the_prompt(vlm: HookedVLM, film_paths, condition: str) -> None:
    specs = [PromptSpec(question=q, condition=condition, image=film_paths["gray"]) for q in QUESTIONS]
    assert vlm.prompts.build(specs).input_ids.shape[1] > vlm.hf_model.config.text_config.sliding_window
    fast = score_shared_prefix(vlm, vlm.prompts, specs, batch_size=3)
    naive = _naive(vlm, specs)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-4)
    assert torch.equal(fast > 0, naive > 0)


def test_sweep_fast_path_equals_naive_on_the_organism(tmp_path: Path) -> None:
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    questions = load_questions(export_questions(cfg, tmp_path / "qs", n_films=3))
    vlm = HookedVLM.from_pretrained(default_organism_dir())
    cfg_eval = EvalConfig(conditions=("image", "blank", "none", "swap"), batch_size=8)
    assert cfg_eval.fast
    run_sweep(vlm, questions, cfg_eval, tmp_path / "fast.jsonl", progress=False)
    assert read_header(tmp_path / "fast.jsonl")["path"] == "shared-prefix"
    rows = read_rows(tmp_path / "fast.jsonl")[::3]  # a third of the prompts, every condition, one at a time
    assert {r["condition"] for r in rows} == set(cfg_eval.conditions)
    images = {q.id: q.image for q in questions}
    from flipscope.experiments.evaluation import swap_images

    swaps = swap_images(questions, 0)
    texts = {q.id: q.prompts for q in questions}
    specs = [
        PromptSpec(
            question=texts[r["question_id"]][r["prompt_index"]],
            condition=r["condition"],
            image=images[r["question_id"]],
            swap_image=swaps[r["question_id"]],
        )
        for r in rows
    ]
    naive = _naive(vlm, specs)
    fast = torch.tensor([r["margin"] for r in rows])
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-4)
    assert [r["answer"] == "yes" for r in rows] == (naive > 0).tolist()


def test_vision_runs_once_per_image_and_once_per_run_for_the_blank(tmp_path: Path) -> None:
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    questions = load_questions(export_questions(cfg, tmp_path / "qs", n_films=3))
    vlm = HookedVLM.from_pretrained(default_organism_dir())
    images_seen: list[int] = []
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(
        lambda module, args, output: images_seen.append(output.last_hidden_state.shape[0])
    )
    try:
        cfg_eval = EvalConfig(conditions=("image", "blank"), questions_per_unit=4)
        run_sweep(vlm, questions, cfg_eval, tmp_path / "s.jsonl", progress=False)
    finally:
        handle.remove()
    assert len(questions) == 12 and len(read_rows(tmp_path / "s.jsonl")) == 12 * 10 * 2
    # One per film (its four questions share it) in each unit that holds it, one blank per run.
    films_per_unit = [len({q.image for q in questions[i : i + 4]}) for i in range(0, 12, 4)]
    assert sum(images_seen) == sum(films_per_unit) + 1 == 3 + 1


def _copied_rows(cache, repeats: int):
    """HF's own way: every layer's copies, on a deep copy, kept through the forward."""
    import copy

    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(repeats)
    return copied


def test_shared_cache_rows_equal_hf_copies_bit_for_bit_and_leave_the_prefix_as_it_was(
    vlm: HookedVLM, film_paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flipscope.model import kv

    specs = [PromptSpec(question=q, image=film_paths["gray"]) for q in QUESTIONS]
    prefix = kv.run_prefix(vlm, vlm.prompts, specs[0])
    kept = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    shared = score_shared_prefix(vlm, vlm.prompts, specs, batch_size=3, prefix=prefix)
    assert torch.equal(score_shared_prefix(vlm, vlm.prompts, specs, batch_size=3, prefix=prefix), shared)  # reused
    layers = prefix.cache.layers
    assert all(torch.equal(a.keys, k) and torch.equal(a.values, v) for a, (k, v) in zip(layers, kept, strict=True))

    def double(x: torch.Tensor, hook) -> torch.Tensor:  # a different edit per variant at the last token
        return x * torch.arange(1, len(x) + 1, dtype=x.dtype)[:, None, None]

    hooks = [("blocks.1.hook_resid_post", double)]
    variants = kv.score_last_token(vlm, vlm.prompts, specs, 3, hooks)
    monkeypatch.setattr(kv, "shared_rows", _copied_rows)
    assert torch.equal(score_shared_prefix(vlm, vlm.prompts, specs, batch_size=3, prefix=prefix), shared)
    assert torch.equal(kv.score_last_token(vlm, vlm.prompts, specs, 3, hooks), variants)
    assert not torch.equal(variants[:, 0], variants[:, 1])  # the variants differ: the edit reached the margin
