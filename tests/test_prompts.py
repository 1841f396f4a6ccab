"""Prompts through the model's own processor, for every image condition and image format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipscope.errors import FlipscopeError
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.images import BlankSpec, blank_image, load_image
from flipscope.model.prompts import ModelInputs, PromptBuilder


@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "gray16"])
def test_every_format_loads_as_the_same_rgb_film(film_paths: dict[str, Path], kind: str) -> None:
    reference = np.asarray(Image.open(film_paths["gray"]))
    loaded = load_image(film_paths[kind])
    assert loaded.mode == "RGB" and loaded.size == (36, 40)
    pixels = np.asarray(loaded)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], reference)


def test_sixteen_bit_is_windowed_to_its_range(tmp_path: Path) -> None:
    twelve_bit = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "twelve.png"
    Image.fromarray(twelve_bit).save(path)
    pixels = np.asarray(load_image(path))[:, :, 0]
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_array_equal(np.asarray(load_image(twelve_bit))[:, :, 0], pixels)


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255
    pixels = np.asarray(load_image(Image.fromarray(rgba)))
    assert (pixels[:2] == 200).all() and (pixels[2:] == 0).all()


def test_blank_images() -> None:
    size = (20, 10)
    gray, white = blank_image(BlankSpec(), size), blank_image(BlankSpec(kind="white"), size)
    noise = np.asarray(blank_image(BlankSpec(kind="noise", seed=1), (256, 256)), dtype=np.float64)
    assert gray.size == size and (np.asarray(gray) == 128).all()
    assert (np.asarray(white) == 255).all()
    assert abs(noise.mean() - 128) < 2 and abs(noise.std() - 64) < 4  # clipping trims the sd slightly
    assert (noise[:, :, 0] == noise[:, :, 1]).all()
    again = np.asarray(blank_image(BlankSpec(kind="noise", seed=1), (256, 256)), dtype=np.float64)
    np.testing.assert_array_equal(noise, again)
    with pytest.raises(FlipscopeError, match="blank kind 'black'"):
        BlankSpec(kind="black")


def test_conditions_share_the_token_layout(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    question = "Is there an effusion?"
    built = {
        condition: vlm.prompts.build(
            [
                PromptSpec(
                    question=question, condition=condition, image=film_paths["gray"], swap_image=film_paths["other"]
                )
            ]
        )
        for condition in ("image", "blank", "none", "swap")
    }
    n_soft = vlm.hf_model.config.mm_tokens_per_image
    image_token = vlm.hf_model.config.image_token_id
    for condition in ("image", "blank", "swap"):
        inputs = built[condition]
        assert torch.equal(inputs.input_ids, built["image"].input_ids)
        assert int((inputs.input_ids == image_token).sum()) == n_soft
        assert int(inputs.token_type_ids.sum()) == n_soft
        assert inputs.pixel_values.shape == (1, 3, *vlm.prompts.image_size[::-1])
    none = built["none"]
    assert none.pixel_values is None and int((none.input_ids == image_token).sum()) == 0
    # The question follows the image; the prompt ends with the model turn.
    text = vlm.prompts.text(PromptSpec(question=question, condition="none"))
    assert text.endswith("Is there an effusion?<end_of_turn>\n<start_of_turn>model\n")
    assert not torch.equal(built["image"].pixel_values, built["swap"].pixel_values)
    assert not torch.equal(built["image"].pixel_values, built["blank"].pixel_values)


def test_swap_scores_like_the_other_image(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    question = "Is there an effusion?"
    swapped = vlm.score(
        vlm.prompts.build(
            [PromptSpec(question=question, condition="swap", image=film_paths["gray"], swap_image=film_paths["other"])]
        )
    )
    other = vlm.score(vlm.prompts.build([PromptSpec(question=question, image=film_paths["other"])]))
    own = vlm.score(vlm.prompts.build([PromptSpec(question=question, image=film_paths["gray"])]))
    assert torch.equal(swapped, other)
    assert not torch.equal(swapped, own)  # the projector is random, so the image reaches the margin


def test_white_and_noise_blanks_are_used(vlm: HookedVLM) -> None:
    spec = PromptSpec(question="Is there an effusion?", condition="blank")
    pixels = {
        kind: PromptBuilder(vlm.processor, blank=BlankSpec(kind=kind)).build([spec]).pixel_values
        for kind in ("gray", "white", "noise")
    }
    assert float(pixels["gray"].abs().max()) < 0.01  # 128 normalises to ~0 with mean=std=0.5
    assert torch.allclose(pixels["white"], torch.ones_like(pixels["white"]))
    assert float(pixels["noise"].std()) > 0.3


def test_system_prompt_goes_through_the_chat_template(vlm: HookedVLM) -> None:
    builder = PromptBuilder(vlm.processor, system_prompt="You are a radiologist.")
    text = builder.text(PromptSpec(question="Is there an effusion?", condition="none"))
    assert text.startswith("<bos><start_of_turn>user\nYou are a radiologist.\n\nIs there an effusion?")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(question="Is there an effusion?", image="/no/such/film.png"), r"'/no/such/film.png' does not exist"),
        (dict(question="Is there an effusion?", image="CORRUPT"), r"corrupt.png' is not a readable image"),
        (
            dict(question="Is there an effusion?", condition="grey"),
            r"image condition 'grey' is unknown; expected one of",
        ),
        (dict(question="   ", image="GRAY"), r"question '   ' is empty"),
        (dict(question="Is there an effusion?", condition="image"), r"condition 'image' needs an image"),
        (
            dict(question="Is there an effusion?", condition="swap", image="GRAY"),
            r"condition 'swap' needs a swap_image",
        ),
    ],
)
def test_bad_input_raises_flipscope_error(
    vlm: HookedVLM, film_paths: dict[str, Path], spec: dict, message: str
) -> None:
    spec = {
        k: film_paths["corrupt"] if v == "CORRUPT" else film_paths["gray"] if v == "GRAY" else v
        for k, v in spec.items()
    }
    with pytest.raises(FlipscopeError, match=message):
        vlm.prompts.build([PromptSpec(**spec)])


def test_empty_batch_is_refused(vlm: HookedVLM) -> None:
    with pytest.raises(FlipscopeError, match="zero prompts"):
        vlm.prompts.build([])


def test_cached_build_equals_the_processor_path(vlm: HookedVLM, film_paths: dict[str, Path]) -> None:
    specs = [
        PromptSpec(question="Is there an effusion?", image=film_paths["rgba"]),
        PromptSpec(question="Do you see any pleural effusion in this film?", condition="none"),
        PromptSpec(question="Is there an effusion?", condition="blank"),
        PromptSpec(question="Is there an effusion?", image=film_paths["gray16"]),
        PromptSpec(question="Are the lungs clear?", condition="swap", swap_image=film_paths["other"]),
    ]
    builder = PromptBuilder(vlm.processor)
    fast = builder.build(specs)
    reference = ModelInputs.collate(
        [builder.encode(s) for s in specs], pad_token_id=vlm.processor.tokenizer.pad_token_id
    )
    for name, tensor in reference.as_kwargs().items():
        assert torch.equal(tensor, fast.as_kwargs()[name]), name
