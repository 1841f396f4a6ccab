"""A real Gemma 3 language model given eyes: `Gemma3ForCausalLM` weights grafted, unchanged, into a
`Gemma3ForConditionalGeneration` with a new SigLIP tower and projector, as Gemma 3's own VLMs pair
one language model with one vision encoder.

The language model's every weight is copied; its vocabulary gains Gemma 3's `<image_soft_token>`
(a row no forward reads: its positions take the projected image features) when the tokenizer lacks
it, as the GGUF of gemma-3-270m does. With no image in the prompt the grafted model computes what
the language model alone computes (a test checks the logits).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    SiglipVisionConfig,
)

from flipscope.errors import FlipscopeError
from flipscope.model.tiny import GEMMA_CHAT_TEMPLATE, gemma3_processor

__all__ = ["IMAGE_TOKENS", "graft_vision"]

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _tokenizer(folder: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    missing = [t for t in IMAGE_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer._set_model_specific_special_tokens(dict(IMAGE_TOKENS))  # named, as Gemma3Processor reads them
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def graft_vision(
    lm_folder: str | os.PathLike[str],
    *,
    image_size: int = 64,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    vision_layers: int = 2,
    vision_d_model: int = 64,
    vision_heads: int = 2,
    seed: int = 0,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A Gemma 3 VLM around the `Gemma3ForCausalLM` saved in `lm_folder`, with a randomly
    initialised SigLIP tower and projector (the projector re-drawn: HF's zeros would blind it).

    Raises:
        FlipscopeError: the folder holds no Gemma 3 text model.
    """
    folder = Path(lm_folder)
    lm = Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)
    if lm.config.model_type != "gemma3_text":
        raise FlipscopeError(f"{str(folder)!r} holds a {lm.config.model_type!r} model; expected gemma3_text")
    tokenizer = _tokenizer(folder)
    text = lm.config.to_dict()
    text["vocab_size"] = max(len(tokenizer), lm.config.vocab_size)
    vision = SiglipVisionConfig(
        hidden_size=vision_d_model,
        intermediate_size=2 * vision_d_model,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["boi_token"]),
        eoi_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["eoi_token"]),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    grown = torch.zeros(config.text_config.vocab_size, embed.shape[1], dtype=embed.dtype)
    grown[: embed.shape[0]] = embed
    state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
    return model.eval(), gemma3_processor(tokenizer, image_size=image_size, mm_tokens_per_image=mm_tokens_per_image)
