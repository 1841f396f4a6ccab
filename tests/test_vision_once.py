"""Each distinct image of a batch through the vision tower once, where a stage asks for it."""

from __future__ import annotations

from pathlib import Path

import torch

from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.vision_once import distinct_rows


def _specs(film_paths: dict[str, Path]) -> list[PromptSpec]:
    a, b = str(film_paths["gray"]), str(film_paths["other"])
    questions = ("Is there an effusion?", "Do you see any effusion in this film?", "Are the lungs clear?")
    return [
        *(PromptSpec(question=q, image=a) for q in questions),
        PromptSpec(question=questions[0], condition="none"),
        *(PromptSpec(question=q, image=b) for q in questions),
        PromptSpec(question=questions[1], image=a),
    ]


def _tower_rows(vlm: HookedVLM) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []
    handle = vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: rows.append(o[0].shape[0]))
    return rows, handle


def test_distinct_rows() -> None:
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    kept, inverse = distinct_rows(torch.stack([a, b, a, a, b]))
    assert kept == [0, 1] and inverse.tolist() == [0, 1, 0, 0, 1]


def test_each_image_is_encoded_once_and_margins_agree(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    inputs = vlm.prompts.build(_specs(film_paths))
    rows, handle = _tower_rows(vlm)
    try:
        plain = vlm.score(inputs)
        assert rows == [7]  # seven prompts with an image: the tower on each
        with vlm.distinct_images():
            once = vlm.score(inputs)
            logits, cache = vlm.run_with_cache(inputs, names_filter="blocks.1.hook_resid_post", positions="last")
        assert rows[1:] == [2]  # two distinct films, encoded once for both forwards
        torch.testing.assert_close(once, plain, atol=1e-5, rtol=1e-5)
        _, reference = vlm.run_with_cache(inputs, names_filter="blocks.1.hook_resid_post", positions="last")
        torch.testing.assert_close(cache["blocks.1.hook_resid_post"], reference["blocks.1.hook_resid_post"])
        rows.clear()
        with vlm.distinct_images(), vlm.hooks(fwd_hooks=[("vision.hook_out", lambda x, hook: x)]):
            vlm.score(inputs)  # a hook on the tower sees every row, so it stays per prompt
        assert rows == [7]
    finally:
        handle.remove()
    assert torch.equal(vlm.score(inputs), plain)  # off again after the block: the HF forward bit for bit


def test_a_batch_run_again_in_the_block_reuses_its_encoding(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    specs = _specs(film_paths)
    distinct = vlm.prompts.build([specs[0], specs[4]])  # two films, once each
    again = vlm.prompts.build([specs[1], specs[5]])  # the same films under other questions: equal pixels
    other = vlm.prompts.build([specs[4], specs[0]])  # the films the other way round
    plain = [vlm.score(inputs) for inputs in (distinct, again, other)]
    rows, handle = _tower_rows(vlm)
    try:
        with vlm.distinct_images():
            first, second, third = vlm.score(distinct), vlm.score(distinct), vlm.score(again)
            assert rows == [2]  # one encoding serves all three (the third's pixels are equal, not the same tensor)
            swapped = vlm.score(other)
            vlm.score(distinct)
            assert rows == [2, 2, 2]  # another batch is encoded, and the memo keeps only the last
            distinct.pixel_values[0] = distinct.pixel_values[1]  # changed in place: the memo must not serve it
            changed = vlm.score(distinct)
            assert rows == [2, 2, 2, 1]  # both rows now show one film
        assert vlm.image_memo is None  # let go with the block
    finally:
        handle.remove()
    for got, want in ((first, plain[0]), (second, plain[0]), (third, plain[1]), (swapped, plain[2])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed, vlm.score(distinct), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, plain[0], atol=1e-3)  # the changed film gave another margin
