"""SAEs through sae-lens, checked against the model they read, and their encodings."""

from flipscope.sae.encode import (
    PositionEncoding,
    SAEEncoding,
    check_features,
    decoder_vectors,
    encode_prompts,
    encode_with_error,
    feature_encoder,
)
from flipscope.sae.load import check_sae, gemmascope_folder_to_sae, load_sae, sae_digest

__all__ = [
    "PositionEncoding",
    "SAEEncoding",
    "check_features",
    "check_sae",
    "decoder_vectors",
    "encode_prompts",
    "encode_with_error",
    "feature_encoder",
    "gemmascope_folder_to_sae",
    "load_sae",
    "sae_digest",
]
