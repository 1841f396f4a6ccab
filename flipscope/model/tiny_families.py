"""Offline checkpoints of the other model families, built from a `TinyVLMConfig`.

Each is the real HF class with its own processor, special tokens and chat template (LLaVA-1.5's,
Qwen2.5-VL's, Gemma 3's), randomly initialised and written with `save_pretrained`, so it loads
through the same path a user takes for LLaVA-Med, Lingshu or MedGemma 27B text:

- `gemma3_text`: `Gemma3ForCausalLM` and a tokenizer (MedGemma 27B text);
- `llava`: `LlavaForConditionalGeneration` (Llama + CLIP) and a `LlavaProcessor` (LLaVA-1.5,
  LLaVA-Med, LLaVA-Rad converted to HF);
- `qwen2_5_vl`: `Qwen2_5_VLForConditionalGeneration` and flipscope's still-image Qwen processor
  (Lingshu, HuatuoGPT-Vision).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Gemma3ForCausalLM,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flipscope.model.families.qwen_processor import QwenImageProcessor
from flipscope.model.tiny import (
    _STRUCTURAL_WORDS,
    GEMMA_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TinyVLMConfig,
    gemma_text_config,
    word_tokenizer,
)

__all__ = ["LLAVA_CHAT_TEMPLATE", "QWEN2_5_VL_CHAT_TEMPLATE", "TINY_BUILDERS", "save_tiny"]

# LLaVA-1.5's chat template as llava-hf ships it: images first, then the text, `USER: ... ASSISTANT:`.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2.5-VL's chat template (default system turn, `<|vision_start|><|image_pad|><|vision_end|>`).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAVA_SPECIALS = ("<pad>", "</s>", "<s>", "<unk>", "<image>")
_LLAVA_WORDS = ("\n", "user", "assistant", "system", ":")
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_WORDS = ("\n", "user", "assistant", "system", "you", "are", "a", "helpful", ".")


def _random_projector(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim == 2:
                param.normal_(0.0, param.shape[1] ** -0.5)


def build_gemma3_text(cfg: TinyVLMConfig) -> tuple[Gemma3ForCausalLM, Any]:
    """A `Gemma3ForCausalLM` (MedGemma 27B text's class) and its tokenizer with Gemma's template."""
    tokenizer = word_tokenizer(
        cfg.words,
        SPECIAL_TOKENS,
        _STRUCTURAL_WORDS,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    config = gemma_text_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if cfg.perturb_norms and "norm" in name and param.ndim == 1:
                param.normal_(0.0, 0.1)
    return model.eval(), tokenizer


def _llama_config(cfg: TinyVLMConfig, vocab: int, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.max_positions,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def build_llava(
    cfg: TinyVLMConfig, *, vision_feature_layer: int = -2
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-1.5-architecture model (Llama decoder, CLIP vision tower, 2-layer projector).

    One soft token per CLIP patch (`(image_size / patch_size)²`); `vision_feature_layer` is the
    CLIP hidden state the projector reads (LLaVA-1.5's -2; a model of few layers may read its last).
    """
    tokenizer = word_tokenizer(
        cfg.words,
        _LLAVA_SPECIALS,
        _LLAVA_WORDS,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_d_model,
        intermediate_size=cfg.vision_d_mlp or 2 * cfg.vision_d_model,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(**_llama_config(cfg, max(len(tokenizer), cfg.vocab_size), tokenizer, head_dim=cfg.head_dim))
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    _random_projector(model.model.multi_modal_projector)
    return model.eval(), processor


def build_qwen2_5_vl(cfg: TinyVLMConfig) -> tuple[Qwen2_5_VLForConditionalGeneration, QwenImageProcessor]:
    """A Qwen2.5-VL-architecture model (Qwen2 decoder with multimodal rotary positions, windowed ViT)."""
    tokenizer = word_tokenizer(
        cfg.words,
        _QWEN_SPECIALS,
        _QWEN_WORDS,
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    pixels = cfg.image_size * cfg.image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=pixels // 4,
        max_pixels=pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = QwenImageProcessor(tokenizer, image_processor, QWEN2_5_VL_CHAT_TEMPLATE)
    head_dim = cfg.d_model // cfg.n_heads
    section = head_dim // 2 // 4
    text = _llama_config(
        cfg,
        max(len(tokenizer), cfg.vocab_size),
        tokenizer,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [section * 2, section, section],
        },
    )
    vision = {
        "depth": cfg.vision_layers,
        "hidden_size": cfg.vision_d_model,
        "intermediate_size": cfg.vision_d_mlp or 2 * cfg.vision_d_model,
        "num_heads": cfg.vision_heads,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": cfg.patch_size * 4,
        "fullatt_block_indexes": [cfg.vision_layers - 1],
        "out_hidden_size": cfg.d_model,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _random_projector(model.model.visual.merger)
    return model.eval(), processor


TINY_BUILDERS: dict[str, Callable[[TinyVLMConfig], tuple[nn.Module, Any]]] = {
    "gemma3_text": build_gemma3_text,
    "llava": build_llava,
    "qwen2_5_vl": build_qwen2_5_vl,
}


def save_tiny(family: str, cfg: TinyVLMConfig, directory: str | Path, *, words: Sequence[str] = ()) -> Path:
    """Build a tiny checkpoint of `family` and write model + processor (or tokenizer) to `directory`."""
    if words:
        cfg = TinyVLMConfig(**{**cfg.__dict__, "words": tuple(words)})
    model, processor = TINY_BUILDERS[family](cfg)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
