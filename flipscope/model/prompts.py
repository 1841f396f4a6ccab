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

ImageCondition = Literal["image", "blank", "none", "swap", "context"]
IMAGE_CONDITIONS: tuple[str, ...] = get_args(ImageCondition)
# Qwen2.5-VL-style processors size images by a pixel budget: the blank is this size (256 tokens).
DYNAMIC_BLANK_SIZE = (448, 448)


@dataclass(frozen=True, kw_only=True)
class PromptSpec:
    """One prompt to build.

    Attributes:
        question: The yes/no question, as the clinician wrote it (non-empty).
        condition: What stands in the image slot (see module docstring).
        image: The sample's image (path, PIL image or array); required for `image`.
        swap_image: The image shown instead under `swap`.
        context: For text-evidence models (`gemma3_text`): the passage (e.g. a report) shown
            under `context`; under `swap`, the passage shown instead is `swap_context`.
    """

    question: str
    condition: str = "image"  # an ImageCondition; validated here so user input gets a clear error
    image: ImageLike | None = None
    swap_image: ImageLike | None = None
    context: str | None = None
    swap_context: str | None = None

    @property
    def passage(self) -> str | None:
        """The text evidence this prompt shows (None for image prompts and `none`)."""
        return self.context if self.condition == "context" else self.swap_context

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise FlipscopeError(f"question {self.question!r} is empty; expected a yes/no question")
        if self.condition not in IMAGE_CONDITIONS:
            raise FlipscopeError(
                f"image condition {self.condition!r} is unknown; expected one of {', '.join(IMAGE_CONDITIONS)}"
            )
        if self.condition == "image" and self.image is None:
            raise FlipscopeError(f"condition 'image' needs an image (question {self.question!r})")
        if self.condition == "swap" and self.swap_image is None and self.swap_context is None:
            raise FlipscopeError(f"condition 'swap' needs a swap_image or swap_context (question {self.question!r})")
        if self.condition == "context" and not (isinstance(self.context, str) and self.context.strip()):
            raise FlipscopeError(f"condition 'context' needs a non-empty context passage (question {self.question!r})")

    @property
    def shows_image(self) -> bool:
        return self.condition in ("image", "blank") or (self.condition == "swap" and self.swap_image is not None)


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """A left-padded batch ready for `Gemma3ForConditionalGeneration.forward`.

    Attributes:
        input_ids: Token ids; pad id in the padded columns.
        attention_mask: 1 on real tokens.
        token_type_ids: 1 on image soft tokens (switches on bidirectional attention in the block).
        position_ids: Positions counted over real tokens only.
        pixel_values: One processed image per row that has image tokens, in row order, or None
            (Qwen2.5-VL: the images' patches, concatenated).
        extra: Further processor outputs the forward takes (Qwen2.5-VL's `image_grid_thw`).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_type_ids: Int[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "n_images channel height width"] | Float[Tensor, "n_patches patch_dim"] | None = None
    extra: Mapping[str, Tensor] = field(default_factory=dict)

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
            extra={k: v.to(device) for k, v in self.extra.items()},
        )

    def columns(self, index: Int[Tensor, "batch width"]) -> ModelInputs:
        """Each row's tokens at its columns `index` (a prefix, a slice), its images and extras kept."""
        return replace(
            self,
            input_ids=self.input_ids.gather(1, index),
            attention_mask=self.attention_mask.gather(1, index),
            token_type_ids=self.token_type_ids.gather(1, index),
            position_ids=self.position_ids.gather(1, index),
        )

    def rows(self, index: Sequence[int]) -> ModelInputs:
        """The batch's rows `index`, each with its image and processor extras.

        Raises:
            FlipscopeError: the images are not one per row (Qwen2.5-VL's patches, a batch mixing
                rows with and without an image).
        """
        pixels, rows = self.pixel_values, list(index)
        if pixels is not None and pixels.shape[0] != len(self):
            raise FlipscopeError(f"{pixels.shape[0]} images for {len(self)} rows: rows cannot take their own images")
        return replace(
            self,
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            token_type_ids=self.token_type_ids[rows],
            position_ids=self.position_ids[rows],
            pixel_values=None if pixels is None else pixels[rows],
            extra={k: v[rows] for k, v in self.extra.items()},
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
        kwargs.update(self.extra)
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
        extra: dict[str, list[Tensor]] = {}
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, width - length :] = row["input_ids"].reshape(-1)
            attention_mask[i, width - length :] = 1
            if "token_type_ids" in row:
                token_type_ids[i, width - length :] = row["token_type_ids"].reshape(-1)
            if "pixel_values" in row:
                pixels.append(row["pixel_values"])
            for key in row.keys() - _TOKEN_KEYS:
                extra.setdefault(key, []).append(row[key])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            pixel_values=torch.cat(pixels) if pixels else None,
            extra={k: torch.cat(v) for k, v in extra.items()},
        )


_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "pixel_values"})


@dataclass
class PromptBuilder:
    """Builds `ModelInputs` with a model's own processor and chat template.

    Attributes:
        processor: The model's processor (`Gemma3Processor`, `LlavaProcessor`, ...), or its
            tokenizer for a text-only model: anything with a chat template.
        blank: What the `blank` condition shows.
        system_prompt: Optional system turn, placed by the chat template.
        context_format: How a text-evidence prompt joins the passage and the question.
    """

    processor: Any
    blank: BlankSpec = field(default_factory=BlankSpec)
    system_prompt: str | None = None
    context_format: str = "{context}\n\n{question}"
    _token_cache: dict[tuple[str, Any], dict[str, Tensor]] = field(default_factory=dict, init=False, repr=False)

    def with_blank(self, blank: BlankSpec) -> PromptBuilder:
        """This builder showing `blank` under the `blank` condition."""
        return PromptBuilder(self.processor, blank, self.system_prompt, self.context_format)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @cached_property
    def image_size(self) -> tuple[int, int]:
        """(width, height) the blank is drawn at: the size the image processor resizes to, or
        `DYNAMIC_BLANK_SIZE` for a processor that sizes images by a pixel budget (Qwen2.5-VL)."""
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            raise FlipscopeError("this model takes no images (its processor has no image processor)")
        size = getattr(image_processor, "size", None) or {}
        height = size.get("height") or size.get("shortest_edge")
        width = size.get("width") or size.get("shortest_edge")
        if "longest_edge" in size and "height" not in size:
            return DYNAMIC_BLANK_SIZE
        if not (height and width):
            raise FlipscopeError(f"image processor size {size!r} has no height/width")
        return int(width), int(height)

    @cached_property
    def fixed_layout(self) -> bool:
        """Whether every image becomes the same number of tokens (so a prompt's token ids do not
        depend on which image fills the slot); False for pixel-budget processors (Qwen2.5-VL)."""
        size = getattr(getattr(self.processor, "image_processor", None), "size", None) or {}
        return not ("longest_edge" in size and "height" not in size)

    @cached_property
    def image_token_id(self) -> int | None:
        """The image's soft-token id: the tokenizer's (Gemma 3's processor names `<start_of_image>`)."""
        token = getattr(self.tokenizer, "image_token", None) or getattr(self.processor, "image_token", None)
        return None if token is None else int(self.tokenizer.convert_tokens_to_ids(token))

    @cached_property
    def blank_image(self) -> Image.Image:
        """The blank stand-in image, made once."""
        return blank_image(self.blank, self.image_size)

    def image_for(self, spec: PromptSpec) -> Image.Image | None:
        if spec.condition == "image":
            return load_image(spec.image)
        if spec.condition == "swap" and spec.swap_image is not None:
            return load_image(spec.swap_image)
        if spec.condition == "blank":
            return self.blank_image
        return None

    def messages(self, spec: PromptSpec, image: Image.Image | None = None) -> list[dict[str, Any]]:
        """The chat messages for one prompt (image slot first, then the question; a text passage
        joined before the question by `context_format`)."""
        content: list[dict[str, Any]] = []
        if spec.shows_image:
            content.append({"type": "image", "image": image if image is not None else self.blank_image})
        passage = spec.passage
        text = spec.question if passage is None else self.context_format.format(context=passage, question=spec.question)
        content.append({"type": "text", "text": text})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append({"role": "user", "content": content})
        return messages

    def text(self, spec: PromptSpec) -> str:
        """The prompt string after the chat template (before image-token expansion)."""
        return self.processor.apply_chat_template(self.messages(spec), add_generation_prompt=True, tokenize=False)

    def encode(self, spec: PromptSpec) -> dict[str, Tensor]:
        """Processor output for one prompt (batch of one, unpadded): the reference path.

        Always carries `token_type_ids` (1 on image tokens, whatever the processor calls it)."""
        messages = self.messages(spec, self.image_for(spec))
        template = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        encoded = dict(self.processor.apply_chat_template(messages, **template))
        mask = encoded.pop("mm_token_type_ids", None)
        if "token_type_ids" not in encoded:
            ids = encoded["input_ids"]
            image = self.image_token_id
            encoded["token_type_ids"] = (
                mask if mask is not None else (ids == image).long() if image is not None else torch.zeros_like(ids)
            )
        return encoded

    def _layout(self, spec: PromptSpec, image: Image.Image | None) -> Any:
        """What besides the question decides a prompt's token ids: whether an image is shown (and
        its size, for pixel-budget processors) and the text passage."""
        size = None if image is None or self.fixed_layout else image.size
        return (image is not None, size, spec.passage)

    def tokens(self, spec: PromptSpec, image: Image.Image | None = None) -> dict[str, Tensor]:
        """Token ids (and masks) of `spec`'s prompt, cached by what decides them (not the pixels)."""
        image = image if image is not None else self.image_for(spec)
        key = (spec.question, self._layout(spec, image))
        cached = self._token_cache.get(key)
        if cached is None:
            if image is not None and self.fixed_layout:
                probe = replace(spec, condition="blank", image=None, swap_image=None)
                encoded = self.encode(probe)
            else:
                encoded = self.encode(spec)
            cached = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            self._token_cache[key] = cached
        return cached

    def text_tokens(self, question: str, with_image: bool) -> dict[str, Tensor]:
        """Token ids of a prompt with the blank (or no image) in its slot."""
        spec = PromptSpec(question=question, condition="blank" if with_image else "none")
        return self.tokens(spec, self.blank_image if with_image else None)

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

    def prefix_length(self, spec: PromptSpec) -> int:
        """Tokens before `spec`'s question that every question with the same evidence shares
        (chat header, image block or text passage): the prefix the KV-cache path runs once."""
        first = self.tokens(replace(spec, question="yes"))["input_ids"].reshape(-1).tolist()
        second = self.tokens(replace(spec, question="no"))["input_ids"].reshape(-1).tolist()
        n = min(len(first), len(second))
        return next((i for i in range(n) if first[i] != second[i]), n)

    def question_mask(self, specs: Sequence[PromptSpec], inputs: ModelInputs) -> Bool[Tensor, "batch pos"]:
        """Which positions of the left-padded batch `inputs` (built from `specs`) hold the
        question's own tokens (the template's tail after them has the same length in every prompt)."""
        mask = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
        width = inputs.input_ids.shape[1]
        before, after = self.template_lengths(with_image=False)
        for row, spec in enumerate(specs):
            n_question = self.text_tokens(spec.question, False)["input_ids"].shape[-1] - before - after
            mask[row, width - after - n_question : width - after] = True
        return mask

    def image_inputs(self, images: Sequence[Image.Image]) -> dict[str, Tensor]:
        """The image processor's outputs for `images` in one call (`pixel_values`, and
        `image_grid_thw` for Qwen2.5-VL)."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw")}

    def pixel_values(
        self, images: Sequence[Image.Image]
    ) -> Float[Tensor, "n_images channel height width"] | Float[Tensor, "n_patches patch_dim"]:
        """The processor's pixel values for `images`, in one call."""
        return self.image_inputs(images)["pixel_values"]

    def build(self, specs: Sequence[PromptSpec]) -> ModelInputs:
        """One left-padded batch for `specs`, in order.

        Equal to collating `encode` of each spec; faster, because a question's token ids are
        computed once and all images go through the image processor together.
        """
        rows: list[dict[str, Tensor]] = []
        images: list[Image.Image] = []
        for spec in specs:
            image = self.image_for(spec)
            rows.append(self.tokens(spec, image))
            if image is not None:
                images.append(image)
        batch = ModelInputs.collate(rows, pad_token_id=int(self.tokenizer.pad_token_id))
        if images:
            vision = self.image_inputs(images)
            pixels = vision.pop("pixel_values")
            batch = replace(batch, pixel_values=pixels, extra=vision)
        return batch
