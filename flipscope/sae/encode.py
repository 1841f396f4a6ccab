"""SAE encodings that keep the error term, at the last token, a span or every position.

`encode_with_error` returns features and `x − decode(encode(x))`, so splicing the SAE in changes
nothing until a feature is edited (SAELens's `use_error_term=True`). `feature_encoder` computes
only the encoder columns of the features an intervention moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE, JumpReLUSAE
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.prompts import PromptSpec
from flipscope.model.protocol import VLM
from flipscope.sae.load import check_sae

__all__ = [
    "PositionEncoding",
    "SAEEncoding",
    "check_features",
    "decoder_vectors",
    "encode_prompts",
    "encode_with_error",
    "feature_encoder",
]


def check_features(sae: Any, features: Sequence[int]) -> None:
    """Raise a `FlipscopeError` naming the first feature index outside the SAE."""
    if not len(features):
        raise FlipscopeError("no features given")
    bad = [int(f) for f in features if not 0 <= int(f) < sae.cfg.d_sae]
    if bad:
        raise FlipscopeError(
            f"feature index {bad[0]} is out of range; the SAE has {sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})"
        )


def decoder_vectors(
    sae: Any, amounts: Float[Tensor, "batch n_features"], features: Sequence[int]
) -> Float[Tensor, "batch d_model"]:
    """Σ_f amounts[:, f] · W_dec[f]: the residual change of moving `features` by `amounts`.

    Raises:
        FlipscopeError: a feature index is outside the SAE.
    """
    check_features(sae, features)
    w_dec = sae.W_dec.detach()[list(features)]
    return amounts.to(w_dec.dtype) @ w_dec


class SAEEncoding(NamedTuple):
    """Feature activations and the error term `x − decode(encode(x))` the SAE leaves out."""

    features: Float[Tensor, "... d_sae"]
    error: Float[Tensor, "... d_model"]


def encode_with_error(sae: SAE, acts: Float[Tensor, "... d_model"]) -> SAEEncoding:
    """Encode `acts` and keep the error term, so that `decode(features) + error == acts`."""
    features = sae.encode(acts.to(sae.dtype))
    error = acts - sae.decode(features).to(acts.dtype)
    return SAEEncoding(features, error)


class PositionEncoding(NamedTuple):
    """Features and error term at every position of a left-padded batch; `mask` marks the
    positions asked for (elsewhere both are zero)."""

    features: Float[Tensor, "batch pos d_sae"]
    error: Float[Tensor, "batch pos d_model"]
    mask: Bool[Tensor, "batch pos"]


@torch.no_grad()
def encode_prompts(
    vlm: VLM, sae: SAE, specs: Sequence[PromptSpec], positions: str = "last"
) -> SAEEncoding | PositionEncoding:
    """Run `specs` as one batch and encode the SAE's hook activations, error term kept.

    `positions`: `"last"` (the last prompt token, where the answer is read; an `SAEEncoding` of
    shape [batch, ...]), `"question"` (the question's own tokens) or `"all"` (every real token);
    the last two give a `PositionEncoding` over the padded batch.

    Raises:
        FlipscopeError: the SAE does not fit the model, or `positions` is unknown.
    """
    if positions not in ("last", "question", "all"):
        raise FlipscopeError(f"positions {positions!r} is unknown; expected 'last', 'question' or 'all'")
    hook = check_sae(sae, vlm)
    inputs = vlm.prompts.build(specs)
    kept = "last" if positions == "last" else None
    acts = vlm.cache_activations(inputs, names_filter=hook, positions=kept)[hook]
    encoding = encode_with_error(sae, acts)
    if positions == "last":
        return encoding
    mask = inputs.attention_mask.bool() if positions == "all" else vlm.prompts.question_mask(specs, inputs)
    mask = mask.to(acts.device)
    return PositionEncoding(encoding.features * mask[..., None], encoding.error * mask[..., None], mask)


def feature_encoder(sae: SAE, features: Sequence[int]):
    """A function x → the activations of `features` only ([..., len(features)]).

    For a JumpReLU SAE it computes just those encoder columns (a clamp or patch of a few
    features at every position then costs a few dot products, not the whole dictionary); any
    other SAE is encoded whole and indexed.
    """
    index = torch.tensor([int(f) for f in features])
    if isinstance(sae, JumpReLUSAE) and sae.cfg.normalize_activations == "none":
        w_enc, b_enc, threshold = sae.W_enc[:, index], sae.b_enc[index], sae.threshold[index]

        def encode(x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... n_features"]:
            pre = sae.process_sae_in(x) @ w_enc + b_enc
            return torch.relu(pre) * (pre > threshold).to(pre.dtype)

        return encode
    return lambda x: sae.encode(x)[..., index]
