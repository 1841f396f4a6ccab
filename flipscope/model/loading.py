"""Loading a Gemma 3 VLM and its processor from the hub or a local folder, safely and with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration

from flipscope.errors import FlipscopeError

__all__ = ["load_hf_vlm"]


def load_hf_vlm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[Gemma3ForConditionalGeneration, Any]:
    """The HF model (in eval mode, on `device`) and processor of a Gemma 3 VLM: safetensors only,
    no remote code, HF's default attention (sdpa) unless `attn_implementation` says otherwise.

    Raises:
        FlipscopeError: the directory or hub model cannot be loaded, or is not a Gemma 3 VLM.
    """
    source = str(name_or_path)
    local = Path(source).expanduser()
    is_local = local.exists() or source.startswith((".", "/", "~"))
    if is_local and not (local / "config.json").is_file():
        raise FlipscopeError(f"model directory {source!r} has no config.json; expected a saved Gemma 3 VLM")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OSError as err:
        raise FlipscopeError(_hub_help(source, err)) from err
    if getattr(config, "model_type", None) != "gemma3":
        raise FlipscopeError(
            f"model {source!r} has model_type {getattr(config, 'model_type', None)!r}; "
            "expected 'gemma3' (a Gemma3ForConditionalGeneration such as MedGemma 4B)"
        )
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        hf_model = Gemma3ForConditionalGeneration.from_pretrained(
            source, dtype=dtype, use_safetensors=True, trust_remote_code=False, **extra
        )
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except OSError as err:
        raise FlipscopeError(_hub_help(source, err)) from err
    hf_model.to(device).eval()
    return hf_model, processor


def _hub_help(source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = " (HF_HUB_OFFLINE is set, so the hub was not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"could not load model {source!r}{offline}: {reason}. "
        "For a gated hub model such as google/medgemma-4b-it, accept its terms on the model page, "
        "then run `hf auth login` or set HF_TOKEN; or pass the path of a local copy."
    )
