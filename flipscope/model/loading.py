"""Loading a model of any family and its processor from the hub or a local folder, safely and with clear errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig

from flipscope.data.jsonfile import read_json_object
from flipscope.errors import FlipscopeError, first_line
from flipscope.model.families import Family, family_of

__all__ = ["check_device", "load_hf_vlm", "merge_adapter"]


def load_hf_vlm(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    family: str | None = None,
) -> tuple[nn.Module, Any, Family]:
    """The HF model (in eval mode, on `device`), processor and family of a checkpoint: safetensors
    only, no remote code, HF's default attention (sdpa) unless `attn_implementation` says otherwise.
    The family comes from `config.model_type` unless `family` names one.

    Raises:
        FlipscopeError: the directory or hub model cannot be loaded, or is of no family flipscope runs.
    """
    source = str(name_or_path)
    local = Path(source).expanduser()
    is_local = local.exists() or source.startswith((".", "/", "~"))
    device = check_device(device)
    if is_local:
        _check_local_config(local)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except OSError as err:
        raise FlipscopeError(_hub_help(source, err)) from err
    except ValueError as err:  # e.g. an unknown model type
        raise FlipscopeError(f"model {source!r}: {first_line(err)}") from err
    try:
        chosen = family_of(config, family)
    except FlipscopeError as err:
        raise FlipscopeError(f"model {source!r}: {err}") from err
    hf_model = _load_weights(source, chosen, is_local, dtype=dtype, attn_implementation=attn_implementation)
    try:
        processor = chosen.processor(source)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise FlipscopeError(
            f"model {source!r} has no usable processor or tokenizer ({first_line(err)}); expected "
            "tokenizer.json (or tokenizer.model), tokenizer_config.json and processor_config.json beside "
            "config.json, as `processor.save_pretrained(folder)` writes them"
        ) from err
    if getattr(processor, "tokenizer", processor) is None:
        raise FlipscopeError(f"model {source!r}: its processor has no tokenizer; save the tokenizer beside config.json")
    _check_chat_template(source, processor)
    hf_model.to(device).eval()
    return hf_model, processor, chosen


def _load_weights(
    source: str, family: Family, is_local: bool, *, dtype: torch.dtype, attn_implementation: str | None
) -> nn.Module:
    """The family's HF class `from_pretrained` (safetensors only, no remote code)."""
    cls = getattr(transformers, family.hf_class)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        hf_model = cls.from_pretrained(source, dtype=dtype, use_safetensors=True, trust_remote_code=False, **extra)
    except OSError as err:
        raise FlipscopeError(_hub_help(source, err) if not is_local else _weights_help(source, err)) from err
    except (SafetensorError, RuntimeError, ValueError, KeyError) as err:  # truncated file, shapes not the config's
        raise FlipscopeError(_weights_help(source, err)) from err
    if family.name != "generic" and type(hf_model).__name__ != family.hf_class:
        raise FlipscopeError(f"model {source!r} loaded as {type(hf_model).__name__}; expected {family.hf_class}")
    return hf_model


def merge_adapter(hf_model: nn.Module, adapter: str | os.PathLike[str]) -> nn.Module:
    """`hf_model` with a PEFT adapter (LoRA) merged into its weights: a plain HF model again.

    Raises:
        FlipscopeError: not a PEFT adapter folder with safetensors weights, or not one of this model.
    """
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FlipscopeError(
            f"adapter {str(adapter)!r} has no adapter_config.json; expected a PEFT adapter folder "
            "(`peft_model.save_pretrained(folder)`)"
        )
    if not (path / "adapter_model.safetensors").is_file():
        raise FlipscopeError(f"adapter {str(adapter)!r} has no adapter_model.safetensors (flipscope reads no pickle)")
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing the old way
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(hf_model, str(path), is_trainable=False).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as err:
        raise FlipscopeError(f"adapter {str(adapter)!r} does not fit this model: {first_line(err)}") from err
    return merged.eval()


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device that exists here.

    Raises:
        FlipscopeError: not a device name, or a CUDA device this machine or torch build does not have.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise FlipscopeError(f"device {device!r} is not a torch device (expected cpu, cuda, cuda:1, ...)") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FlipscopeError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise FlipscopeError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0 .. cuda:{count - 1})")
    return parsed


def _check_local_config(local: Path) -> None:
    """A local folder's config.json: present, a JSON object, and not asking for remote code."""
    path = local / "config.json"
    if not path.is_file():
        raise FlipscopeError(
            f"model directory {str(local)!r} has no config.json; expected a saved HF model (`save_pretrained`)"
        )
    config = read_json_object(path, "model config")
    if "auto_map" in config:
        raise FlipscopeError(
            f"{str(path)!r} asks for remote code (auto_map); flipscope never runs code from a model folder. "
            "Convert the checkpoint to a transformers-native class of a flipscope family "
            "(`flipscope families`), or implement a model adapter for it (--model-adapter module:Class)"
        )


def _check_chat_template(source: str, processor: Any) -> None:
    """Render the chat template once at load, so a broken or hostile template (transformers renders
    it in jinja's sandbox, which refuses attribute escapes) is an error now, not hours into a run."""
    from jinja2 import TemplateError

    probe = [{"role": "user", "content": [{"type": "text", "text": "Is there an effusion?"}]}]
    try:
        processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise FlipscopeError(
            f"the chat template of {source!r} cannot be rendered ({type(err).__name__}: {first_line(err)}); "
            "expected the model's own template (chat_template.jinja)"
        ) from err


def _weights_help(source: str, err: BaseException) -> str:
    return (
        f"could not load the weights of {source!r}: {first_line(err)}; expected model.safetensors (or its "
        "shards and index) matching config.json, as `save_pretrained` writes them"
    )


def _hub_help(source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = " (HF_HUB_OFFLINE is set, so the hub was not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"could not load model {source!r}{offline}: {reason}. "
        "For a gated hub model such as google/medgemma-4b-it, accept its terms on the model page, "
        "then run `hf auth login` or set HF_TOKEN; or pass the path of a local copy."
    )
