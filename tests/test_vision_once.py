"""Each distinct image of a batch through the vision tower once, where a stage asks for it."""

from __future__ import annotations

from pathlib import Path

import torch

from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.vision_once import ImageMemo, distinct_rows, encode_images_once


def _specs(film_paths: dict[str, Path]) -> list[PromptSpec]:
    a, b = str(film_paths["gray"]), str(film_paths["other"])
    questions = ("Is there an effusion?", "Do you see any effusion in this film?", "Are the lungs clear?")
    return [
        *(PromptSpec(question=q, image=a) for q in questions),
        PromptSpec(question=questions[0], condition="none"),
        *(PromptSpec(question=q, image=b) for q in questions),
        PromptSpec(question=questions[1], image=a),
    ]


def _empty_memo(vlm: HookedVLM) -> None:
    vlm.image_memo.clear()
    vlm.image_memo.encoded = vlm.image_memo.served = 0


def _tower_rows(vlm: HookedVLM) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The batch sizes the tower runs on from here, starting from an empty memo."""
    _empty_memo(vlm)
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
        assert rows[1:] == [1, 1]  # two distinct films, each encoded alone, once for both forwards
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


def test_an_image_is_encoded_once_across_blocks_and_the_memo_changes_no_bit(
    vlm: HookedVLM, film_paths: dict[str, Path]
) -> None:
    specs = _specs(film_paths)
    distinct = vlm.prompts.build([specs[0], specs[4]])  # two films, once each
    again = vlm.prompts.build([specs[1], specs[5], specs[2]])  # the same films under other questions
    rows, handle = _tower_rows(vlm)
    try:
        with vlm.distinct_images():
            first = vlm.score(distinct)
        with vlm.distinct_images():  # a later stage: the memo outlives the block
            served = vlm.score(again)
            assert rows == [1, 1] and len(vlm.image_memo) == 2
            distinct.pixel_values[0] = distinct.pixel_values[1]  # changed in place: now film b twice
            changed = vlm.score(distinct)
        assert rows == [1, 1]  # film b was served, under its bytes, not under the tensor it came in
        assert (vlm.image_memo.encoded, vlm.image_memo.served) == (2, 3)  # per distinct image of a batch
    finally:
        handle.remove()
    kept, vlm.image_memo = vlm.image_memo, ImageMemo(max_bytes=0)  # nothing kept: the tower on every image
    try:
        with vlm.distinct_images():
            fresh = [vlm.score(batch) for batch in (vlm.prompts.build([specs[0], specs[4]]), again, distinct)]
        assert len(vlm.image_memo) == 0 and vlm.image_memo.encoded == 5
    finally:
        vlm.image_memo = kept
    for got, want in zip((first, served, changed), fresh, strict=True):
        assert torch.equal(got, want)  # each image encoded alone: served or not, the same bits
    assert not torch.allclose(changed[0], first[0], atol=1e-3)  # the changed film gave another margin


def test_an_image_encoding_does_not_depend_on_its_batch(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    specs = _specs(film_paths)
    pair = vlm.prompts.build([specs[0], specs[4]]).as_kwargs()
    alone = vlm.prompts.build([specs[0]]).as_kwargs()
    kept, vlm.image_memo = vlm.image_memo, ImageMemo(max_bytes=0)
    try:
        with torch.no_grad():
            together = encode_images_once(vlm, pair)["mm_encoder_outputs"]["image"].pooler_output
            single = encode_images_once(vlm, alone)["mm_encoder_outputs"]["image"].pooler_output
    finally:
        vlm.image_memo = kept
    assert torch.equal(together[0], single[0])


def test_the_memo_empties_when_a_tower_weight_changes(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    inputs = vlm.prompts.build(_specs(film_paths)[:2])
    weight = next(vlm.hf_model.model.multi_modal_projector.parameters())
    original = weight.detach().clone()
    rows, handle = _tower_rows(vlm)
    try:
        with torch.no_grad(), vlm.distinct_images():
            before = vlm.score(inputs)
            weight.mul_(1.5)  # edited in place: the same tensor, a new version
            after = vlm.score(inputs)
            assert rows == [1, 1] and len(vlm.image_memo) == 1  # one film, encoded again for the new weight
            plain = vlm.score(vlm.prompts.build(_specs(film_paths)[:2]))
        torch.testing.assert_close(after, vlm.score(inputs), atol=1e-5, rtol=1e-5)  # the edited tower's margins
        torch.testing.assert_close(after, plain, atol=0, rtol=0)
        assert not torch.allclose(after, before, atol=1e-4)
    finally:
        handle.remove()
        with torch.no_grad():
            weight.copy_(original)


def test_the_memo_keeps_no_graph_and_is_shared_with_edited_siblings(
    vlm: HookedVLM, film_paths: dict[str, Path]
) -> None:
    kwargs = vlm.prompts.build(_specs(film_paths)[:1]).as_kwargs()
    _empty_memo(vlm)
    with torch.enable_grad():
        encoded = encode_images_once(vlm, kwargs)["mm_encoder_outputs"]["image"].pooler_output
        assert encoded.requires_grad  # this forward's graph reaches the tower's weights
        leaf = {**kwargs, "pixel_values": kwargs["pixel_values"].clone().requires_grad_(True)}
        to_pixels = encode_images_once(vlm, leaf)["mm_encoder_outputs"]["image"].pooler_output
    assert len(vlm.image_memo) == 1 and vlm.image_memo.served == 0  # pixels that require grad bypass it
    (grad,) = torch.autograd.grad(to_pixels.sum(), leaf["pixel_values"])
    assert grad.abs().sum() > 0
    assert not next(iter(vlm.image_memo._rows.values())).requires_grad  # kept without the graph
    assert vlm.edited().image_memo is vlm.image_memo


def test_the_memo_keeps_at_most_its_bytes_least_recently_used_out() -> None:
    row = torch.zeros(4, 8)  # 128 bytes
    memo = ImageMemo(max_bytes=300)
    for key in "abc":
        memo.put(key, row.clone())
        memo.get("a")  # a stays the most recently used
    assert len(memo) == 2 and memo.get("a") is not None and memo.get("b") is None and memo.nbytes == 256
    memo.for_tower("weights 1")
    assert len(memo) == 0 and memo.nbytes == 0
    memo.put("a", row)
    assert len(memo.for_tower("weights 1")) == 1 and len(memo.for_tower("weights 2")) == 0
    nothing = ImageMemo(max_bytes=0)
    nothing.put("a", row)
    assert len(nothing) == 0
