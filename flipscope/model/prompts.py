"""Model inputs from (image, question, image condition), through the model's own processor.

A prompt is the model's chat template applied to one user turn: the image (if any) followed by
the question, then the generation prompt, exactly as MedGemma is prompted. The image condition
says what stands in the image slot:

- `image`: the sample's own image;
- `blank`: a uniform gray image (or white, or Gaussian noise; see `BlankSpec`) of the size the
  processor expects, so the token layout is identical to `image`;
- `none`: no image tokens at all (a text-only prompt);
- `swap`: another image supplied by the caller (e.g. another patient's film).

Batches are left-padded and carry explicit `position_ids` counted over real tokens, so a padded
row sees the same positions as the same prompt alone and its last position is column -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.images import BlankSpec, ImageLike, blank_image, load_image

__all__ = ["ImageCondition", "IMAGE_CONDITIONS", "ModelInputs", "PromptBuilder", "PromptSpec"]

ImageCondition = Literal["image", "blank", "none", "swap"]
IMAGE_CONDITIONS: tuple[str, ...] = get_args(ImageCondition)


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """One prompt to build.

    Attributes:
        question: The yes/no question, as the clinician wrote it (non-empty).
        condition: What stands in the image slot (see module docstring).
        image: The sample's image (path, PIL image or array); required for `image`.
        swap_image: The image shown instead under `swap`.
    """

    question: str
    condition: str = "image"  # an ImageCondition; validated here so user input gets a clear error
    image: ImageLike | None = None
    swap_image: ImageLike | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise FlipscopeError(f"question {self.question!r} is empty; expected a yes/no question")
        if self.condition not in IMAGE_CONDITIONS:
            raise FlipscopeError(
                f"image condition {self.condition!r} is unknown; expected one of {', '.join(IMAGE_CONDITIONS)}"
            )
        if self.condition == "image" and self.image is None:
            raise FlipscopeError(f"condition 'image' needs an image (question {self.question!r})")
        if self.condition == "swap" and self.swap_image is None:
            raise FlipscopeError(f"condition 'swap' needs a swap_image (question {self.question!r})")


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """A left-padded batch ready for `Gemma3ForConditionalGeneration.forward`.

    Attributes:
        input_ids: Token ids; pad id in the padded columns.
        attention_mask: 1 on real tokens.
        token_type_ids: 1 on image soft tokens (switches on bidirectional attention in the block).
        position_ids: Positions counted over real tokens only.
        pixel_values: One processed image per row that has image tokens, in row order, or None.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_type_ids: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "n_images channel height width"] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        """A copy on `device`, with `pixel_values` cast to `dtype` if given."""
        pixels = self.pixel_values
        if pixels is not None:
            pixels = pixels.to(device=device, dtype=dtype or pixels.dtype)
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            token_type_ids=self.token_type_ids.to(device),
            position_ids=self.position_ids.to(device),
            pixel_values=pixels,
        )

    def as_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for the HF forward (no `pixel_values` key when there is no image)."""
        kwargs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
            "position_ids": self.position_ids,
        }
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs

    @classmethod
    def collate(cls, rows: Sequence[Mapping[str, Tensor]], pad_token_id: int) -> ModelInputs:
        """Left-pad processor outputs of single prompts into one batch."""
        if not rows:
            raise FlipscopeError("cannot build a batch from zero prompts")
        lengths = [int(r["input_ids"].shape[-1]) for r in rows]
        width = max(lengths)
        n = len(rows)
        input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        token_type_ids = torch.zeros((n, width), dtype=torch.long)
        pixels: list[Tensor] = []
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, width - length :] = row["input_ids"].reshape(-1)
            attention_mask[i, width - length :] = 1
            if "token_type_ids" in row:
                token_type_ids[i, width - length :] = row["token_type_ids"].reshape(-1)
            if "pixel_values" in row:
                pixels.append(row["pixel_values"])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            pixel_values=torch.cat(pixels) if pixels else None,
        )


@dataclass
class PromptBuilder:
    """Builds `ModelInputs` with a model's own processor and chat template.

    Attributes:
        processor: The model's `Gemma3Processor` (or any processor with a chat template).
        blank: What the `blank` condition shows.
        system_prompt: Optional system turn, placed by the chat template.
    """

    processor: Any
    blank: BlankSpec = field(default_factory=BlankSpec)
    system_prompt: str | None = None
    _token_cache: dict[tuple[str, bool], dict[str, Tensor]] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def image_size(self) -> tuple[int, int]:
        """(width, height) the image processor resizes to."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        height = size.get("height") or size.get("shortest_edge")
        width = size.get("width") or size.get("shortest_edge")
        if not (height and width):
            raise FlipscopeError(f"image processor size {size!r} has no height/width")
        return int(width), int(height)

    @cached_property
    def blank_image(self) -> Image.Image:
        """The blank stand-in image, made once."""
        return blank_image(self.blank, self.image_size)

    def image_for(self, spec: PromptSpec) -> Image.Image | None:
        if spec.condition == "image":
            return load_image(spec.image)
        if spec.condition == "swap":
            return load_image(spec.swap_image)
        if spec.condition == "blank":
            return self.blank_image
        return None

    def messages(self, spec: PromptSpec, image: Image.Image | None = None) -> list[dict[str, Any]]:
        """The chat messages for one prompt (image slot first, then the question)."""
        content: list[dict[str, Any]] = []
        if spec.condition != "none":
            content.append({"type": "image", "image": image if image is not None else self.blank_image})
        content.append({"type": "text", "text": spec.question})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return messages

    def text(self, spec: PromptSpec) -> str:
        """The prompt string after the chat template (before image-token expansion)."""
        return self.processor.apply_chat_template(self.messages(spec), add_generation_prompt=True, tokenize=False)

    def encode(self, spec: PromptSpec) -> dict[str, Tensor]:
        """Processor output for one prompt (batch of one, unpadded): the reference path."""
        encoded = self.processor.apply_chat_template(
            self.messages(spec, self.image_for(spec)),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        return dict(encoded)

    def text_tokens(self, question: str, with_image: bool) -> dict[str, Tensor]:
        """Token ids of a prompt; they do not depend on which image fills the slot, so are cached."""
        key = (question, with_image)
        cached = self._token_cache.get(key)
        if cached is None:
            spec = PromptSpec(question=question, condition="blank" if with_image else "none")
            encoded = self.encode(spec)
            cached = {k: v for k, v in encoded.items() if k != "pixel_values"}
            self._token_cache[key] = cached
        return cached

    def template_lengths(self, with_image: bool) -> tuple[int, int]:
        """Tokens of the chat template before the question (header, image block, its newlines)
        and after it (end of turn, model turn header): the common prefix and suffix of two
        prompts whose questions share no token."""
        first = self.text_tokens("yes", with_image)["input_ids"].reshape(-1).tolist()
        second = self.text_tokens("no", with_image)["input_ids"].reshape(-1).tolist()

        def common(a: list[int], b: list[int]) -> int:
            n = min(len(a), len(b))
            return next((i for i in range(n) if a[i] != b[i]), n)

        prefix, suffix = common(first, second), common(first[::-1], second[::-1])
        return prefix, suffix

    def question_mask(self, specs: Sequence[PromptSpec], inputs: ModelInputs) -> Bool[Tensor, "batch pos"]:
        """Which positions of the left-padded batch `inputs` (built from `specs`) hold the
        question's own tokens."""
        mask = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
        width = inputs.input_ids.shape[1]
        for row, spec in enumerate(specs):
            with_image = spec.condition != "none"
            length = self.text_tokens(spec.question, with_image)["input_ids"].shape[-1]
            prefix, suffix = self.template_lengths(with_image)
            mask[row, width - length + prefix : width - suffix] = True
        return mask

    def pixel_values(self, images: Sequence[Image.Image]) -> Float[Tensor, "n_images channel height width"]:
        """The processor's pixel values for `images`, in one call."""
        return self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def build(self, specs: Sequence[PromptSpec]) -> ModelInputs:
        """One left-padded batch for `specs`, in order.

        Equal to collating `encode` of each spec; faster, because a question's token ids are
        computed once and all images go through the image processor together.
        """
        rows: list[dict[str, Tensor]] = []
        images: list[Image.Image] = []
        for spec in specs:
            image = self.image_for(spec)
            rows.append(self.text_tokens(spec.question, image is not None))
            if image is not None:
                images.append(image)
        batch = ModelInputs.collate(rows, pad_token_id=int(self.processor.tokenizer.pad_token_id))
        if images:
            batch = replace(batch, pixel_values=self.pixel_values(images))
        return batch
