"""Offline Gemma 3 VLM checkpoints built from a config.

MedGemma cannot be downloaded here, so tests and the model organism use small
`Gemma3ForConditionalGeneration` checkpoints with the same classes, processor, chat template
and special tokens. This module builds them: a word-level `tokenizers` tokenizer carrying the
Gemma special tokens, a `Gemma3Processor` with the PIL image processor, the Gemma 3 chat
template, and a randomly initialised model. Everything is written with `save_pretrained`
so it loads back through the same `from_pretrained` path a user takes for MedGemma.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyVLMConfig",
    "build_processor",
    "build_tiny_vlm",
    "gemma_tokenizer",
    "save_tiny_vlm",
    "word_tokenizer",
    "words_of",
]

# Gemma 3's chat template (as shipped with google/gemma-3-4b-it and MedGemma), with every
# newline written as a Jinja string literal so the file round-trips through JSON unchanged.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Gemma's special tokens in the order their ids are assigned here (pad=0, eos=1, bos=2, unk=3).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
_STRUCTURAL_WORDS: tuple[str, ...] = ("\n", "user", "model", "system")


@dataclass(frozen=True, kw_only=True)
class TinyVLMConfig:
    """Sizes of a small Gemma 3 VLM.

    Attributes:
        words: Vocabulary beside the special and structural tokens (lower-cased; punctuation
            marks are tokens of their own).
        text_layers: Decoder layers of the language model.
        d_model: Language-model hidden size.
        d_mlp: Language-model MLP width.
        n_heads: Query heads; `n_kv_heads` key/value heads; `head_dim` per head.
        sliding_window: Window of the sliding-attention layers (every layer but the last).
        vision_layers: SigLIP encoder layers; `vision_d_model` its width.
        image_size: Square input size in pixels; `patch_size` the SigLIP patch.
        mm_tokens_per_image: Image soft tokens after pooling (a square number).
        vocab_size: Rows of the embedding and unembedding (0: the tokenizer's size). Larger values
            add rows no prompt uses, so a benchmark pays a real vocabulary's unembedding (Gemma 3:
            262,208 in MedGemma).
        perturb_norms: Draw RMSNorm gains at random instead of HF's zeros (= unit scale), so that
            tests notice a wrong (1 + w) convention; off for models that are then trained.
        seed: Seed for the random weights.
        global_every: 0: every layer slides but the last; k: every k-th layer attends globally
            (Gemma 3's 5:1), and the last always does, so a model cut short keeps both kinds.
        query_pre_attn_scalar, rope_global, rope_local, rope_scaling, max_positions: Gemma 3
            text-config values (0 / None: HF's defaults); `rope_scaling` is the linear factor of the
            global layers' rotary positions (8 in Gemma 3 4B).
        vision_heads, vision_d_mlp: SigLIP heads and MLP width (0: twice `vision_d_model`).
    """

    words: Sequence[str] = field(default_factory=tuple)
    text_layers: int = 4
    d_model: int = 64
    d_mlp: int = 128
    n_heads: int = 2
    n_kv_heads: int = 1
    head_dim: int = 32
    sliding_window: int = 16
    vision_layers: int = 2
    vision_d_model: int = 32
    image_size: int = 32
    patch_size: int = 8
    mm_tokens_per_image: int = 4
    vocab_size: int = 0
    perturb_norms: bool = True
    seed: int = 0
    global_every: int = 0
    query_pre_attn_scalar: int = 0
    rope_global: float | None = None
    rope_local: float | None = None
    rope_scaling: float | None = None
    max_positions: int = 512
    vision_heads: int = 2
    vision_d_mlp: int = 0


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def words_of(texts: Sequence[str]) -> list[str]:
    """The word-level tokens of `texts` as the tiny tokenizer splits them, first-seen order."""
    splitter = _pre_tokenizer()
    words: list[str] = []
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(text.lower()):
            if word not in words:
                words.append(word)
    return words


def word_tokenizer(
    words: Sequence[str], specials: Sequence[str], structural: Sequence[str], **kwargs: Any
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: `specials` first (never split), then `structural` and `words`
    (lower-cased; punctuation marks are tokens of their own). `kwargs` name its special tokens."""
    vocab: dict[str, int] = {}
    for token in (*specials, *structural, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=kwargs.get("unk_token", specials[0])))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **kwargs)


def gemma_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with Gemma 3's special tokens."""
    return word_tokenizer(
        words,
        SPECIAL_TOKENS,
        _STRUCTURAL_WORDS,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "start_of_turn_token": "<start_of_turn>",
            "end_of_turn_token": "<end_of_turn>",
        },
    )


def gemma3_processor(tokenizer: Any, *, image_size: int, mm_tokens_per_image: int) -> Gemma3Processor:
    """A `Gemma3Processor` around `tokenizer` (which carries Gemma's named image tokens), with square
    `image_size` films and the tokenizer's chat template (Gemma 3's where it has none)."""
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template or GEMMA_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )


def build_processor(words: Sequence[str], *, image_size: int, mm_tokens_per_image: int) -> Gemma3Processor:
    """A `Gemma3Processor` with a word-level tokenizer over `words` and Gemma's special tokens."""
    return gemma3_processor(gemma_tokenizer(words), image_size=image_size, mm_tokens_per_image=mm_tokens_per_image)


def _layer_types(cfg: TinyVLMConfig) -> list[str]:
    every = cfg.global_every or cfg.text_layers
    kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(cfg.text_layers)]
    return [*kinds[:-1], "full_attention"]


def _text_extras(cfg: TinyVLMConfig) -> dict[str, Any]:
    """The Gemma 3 text-config values `cfg` sets beyond HF's defaults (none for the organisms)."""
    extras: dict[str, Any] = {}
    if cfg.query_pre_attn_scalar:
        extras["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar
    if cfg.rope_global is not None or cfg.rope_local is not None or cfg.rope_scaling is not None:
        scaling = {"rope_type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling else {"rope_type": "default"}
        extras["rope_parameters"] = {
            "full_attention": {**scaling, "rope_theta": cfg.rope_global or 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local or 10_000.0},
        }
    return extras


def gemma_text_config(cfg: TinyVLMConfig, tokenizer: Any) -> Gemma3TextConfig:
    """The Gemma 3 language-model config `cfg` describes, over `tokenizer`'s vocabulary."""
    return Gemma3TextConfig(
        vocab_size=max(len(tokenizer), cfg.vocab_size),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        sliding_window=cfg.sliding_window,
        layer_types=_layer_types(cfg),
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **_text_extras(cfg),
    )


def build_tiny_vlm(
    cfg: TinyVLMConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A randomly initialised Gemma 3 VLM and its processor.

    HF initialises the projector weight to zeros (so the model would ignore its image); it is
    re-drawn here so the image reaches the language model. `dtype`/`device` other than float32
    on the CPU create the weights there directly (a MedGemma-sized model is never held twice).
    """
    processor = build_processor(cfg.words, image_size=cfg.image_size, mm_tokens_per_image=cfg.mm_tokens_per_image)
    tokenizer = processor.tokenizer
    text_config = gemma_text_config(cfg, tokenizer)
    vision_config = SiglipVisionConfig(
        hidden_size=cfg.vision_d_model,
        intermediate_size=cfg.vision_d_mlp or 2 * cfg.vision_d_model,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        mm_tokens_per_image=cfg.mm_tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        model = Gemma3ForConditionalGeneration(config)
    else:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
        if cfg.perturb_norms:
            for name, param in model.named_parameters():
                if "norm" in name and param.ndim == 1:
                    param.normal_(0.0, 0.1)
    model.eval()
    return model, processor


def save_tiny_vlm(cfg: TinyVLMConfig, directory: str | Path) -> Path:
    """Build a tiny VLM and write model + processor to `directory` (safetensors)."""
    directory = Path(directory)
    model, processor = build_tiny_vlm(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
