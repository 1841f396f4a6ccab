"""What a real-LM organism ships, and the checkpoint it assembles into.

A real-LM organism directory holds only what training changed, never the base weights::

    vision.safetensors                          the SigLIP tower and projector (float32)
    adapter/adapter_config.json,
    adapter/adapter_model.safetensors           the LoRA (peft format, float16)
    sae/...                                     the SAE (sae-lens format)
    ground_truth.json                           the card, with every file's sha256

`assemble` checks every shipped file against the card's sha256, grafts a fresh tower onto the
installed base language model (`flipscope.organism.real.grafted`), loads the tower, projector and
LoRA, merges the LoRA with peft, and saves the whole HF checkpoint once under
`cache_root("organisms")`, keyed by the deltas' hashes; `HookedVLM.from_pretrained` then reads it
as any checkpoint. The folder is written in a scratch folder and renamed into place, so a
half-written one is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from flipscope.data.atomic import file_sha256, write_atomic, write_json
from flipscope.data.lock import build_once
from flipscope.errors import FlipscopeError
from flipscope.model.gguf import cache_root
from flipscope.organism.config import OrganismConfig

__all__ = ["ADAPTER_DIR", "ASSEMBLED_NAME", "VISION_FILE", "assemble", "delta_files", "save_deltas", "verify_files"]

VISION_FILE = "vision.safetensors"
ADAPTER_DIR = "adapter"
ASSEMBLED_NAME = "flipscope_organism.json"
_VISION_PARTS = ("vision_tower", "multi_modal_projector")


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    write_atomic(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


def save_deltas(model: Any, out: str | os.PathLike[str]) -> None:
    """Write the tower, projector and LoRA of a trained `PeftModel` (as `train_real` returns it)."""
    out = Path(out)
    core = model.get_base_model().model
    vision = {f"{part}.{k}": v.float() for part in _VISION_PARTS for k, v in getattr(core, part).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(vision, out / VISION_FILE)
    model.save_pretrained(out / ADAPTER_DIR)
    (out / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's blank model-card template
    weights = out / ADAPTER_DIR / "adapter_model.safetensors"
    _save_tensors({k: v.half() for k, v in load_file(str(weights)).items()}, weights)


def delta_files(directory: str | os.PathLike[str]) -> list[str]:
    """The shipped delta files of an organism directory, relative to it."""
    directory = Path(directory)
    return [VISION_FILE, *sorted(str(p.relative_to(directory)) for p in (directory / ADAPTER_DIR).glob("*"))]


def verify_files(directory: str | os.PathLike[str], sha256: Mapping[str, str], names: list[str] | None = None) -> str:
    """Check each of `names` (default: every file `sha256` lists) against it; returns a digest of
    the names and hashes.

    Raises:
        FlipscopeError: a file is missing or its sha256 differs.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in sorted(sha256) if names is None else names:
        path = directory / name
        if not path.is_file():
            raise FlipscopeError(f"organism {str(directory)!r}: {name} is missing")
        actual = file_sha256(path)
        if sha256.get(name) != actual:
            raise FlipscopeError(
                f"organism {str(directory)!r}: {name} has sha256 {actual[:16]}…, the card expects "
                f"{str(sha256.get(name))[:16]}…; the file is damaged or from another build"
            )
        digest.update(f"{name}={actual}\n".encode())
    return digest.hexdigest()


def _load_vision(model: Any, directory: Path) -> None:
    tensors = load_file(str(directory / VISION_FILE))
    core = model.model
    for part in _VISION_PARTS:
        prefix = f"{part}."
        getattr(core, part).load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def assemble(
    directory: str | os.PathLike[str], cfg: OrganismConfig, sha256: Mapping[str, str], *, cache: str | None = None
) -> Path:
    """The full HF checkpoint of a real-LM organism, built from the installed base weights and
    the shipped deltas on first use and reused after.

    Raises:
        FlipscopeError: a delta is missing or its sha256 differs from the card's.
    """
    from peft import PeftModel

    from flipscope.organism.real import grafted

    directory = Path(directory)
    key = verify_files(directory, sha256, delta_files(directory))
    folder = (Path(cache) if cache is not None else cache_root("organisms")) / key[:16]
    marker = folder / ASSEMBLED_NAME

    def assembled() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("deltas") == key

    def assemble_into(scratch: Path) -> None:
        vlm = grafted(cfg)
        _load_vision(vlm.hf_model, directory)
        merged = PeftModel.from_pretrained(vlm.hf_model, str(directory / ADAPTER_DIR)).merge_and_unload()
        merged.save_pretrained(scratch, safe_serialization=True)
        vlm.processor.save_pretrained(scratch)
        write_json(scratch / ASSEMBLED_NAME, {"base": cfg.base, "deltas": key})

    return build_once(folder, assembled, assemble_into)
