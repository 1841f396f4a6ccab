"""Qwen2.5-VL's processor for still images, without its video half.

transformers' `Qwen2_5_VLProcessor` cannot be built without torchvision (its video processor
imports it), and flipscope installs no torchvision (its wheel replaces the CPU torch). Prompts
here hold still images only, so this processor does what HF's does for them: apply the chat
template, expand each `<|image_pad|>` into `grid_t·grid_h·grid_w / merge²` copies, and return
`input_ids`, `attention_mask`, `mm_token_type_ids` (1 on image tokens), `pixel_values` and
`image_grid_thw` — equal to HF's output for the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flipscope.data.atomic import write_atomic

__all__ = ["QwenImageProcessor"]

IMAGE_PAD = "<|image_pad|>"


class QwenImageProcessor:
    """Tokenizer + `Qwen2VLImageProcessorPil` + chat template, for image-and-text prompts."""

    def __init__(self, tokenizer: Any, image_processor: Qwen2VLImageProcessorPil, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = IMAGE_PAD
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> QwenImageProcessor:
        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        template = _read_template(folder) or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")
        return cls(tokenizer, image_processor, template)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        write_atomic(folder / "chat_template.jinja", self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
    ) -> Any:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        if not tokenize:
            return text
        images = [item["image"] for m in messages for item in _items(m) if item.get("type") == "image"]
        return self(text, images)

    def __call__(self, text: str, images: list[Any]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            out["image_grid_thw"] = vision["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            pieces = text.split(IMAGE_PAD)
            if len(pieces) != len(images) + 1:
                raise ValueError(f"{len(pieces) - 1} image slots in the prompt for {len(images)} images")
            counts = [int(thw.prod()) // merge for thw in vision["image_grid_thw"]]
            text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        out["mm_token_type_ids"] = (ids == self.image_token_id).long()
        return out


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _read_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        import json

        return json.loads(as_json.read_text()).get("chat_template")
    return None
