"""Which model produced a result: the identity written into every result file's header."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["model_identity"]


def model_identity(vlm: Any) -> dict[str, Any]:
    """A hooked model's name (hub id or folder name), HF class, size, a weight fingerprint, a weight
    edit folded into its checkpoint, its adapter and what its edits are (one edit's description
    merged in, several as a list under `edits`), so results (evaluation stores, FlipBanks) can be
    checked against a model.

    The fingerprint hashes the first 64 values of every parameter rounded to bfloat16, so a
    float32 and a bfloat16 load of one checkpoint agree, on any device; an adapter merged into
    the weights changes it, so a base model's store never resumes into an adapted run.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in vlm.hf_model.named_parameters():
            head = param.detach().reshape(-1)[:64].to("cpu", torch.bfloat16).to(torch.float32)
            digest.update(name.encode() + str(tuple(param.shape)).encode() + head.numpy().tobytes())
    local = Path(vlm.name_or_path).expanduser()
    identity: dict[str, Any] = {
        "name": local.resolve().name if local.exists() else vlm.name_or_path,
        "architecture": type(vlm.hf_model).__name__,
        "n_params": sum(p.numel() for p in vlm.hf_model.parameters()),
        "fingerprint": digest.hexdigest()[:16],
    }
    folded = getattr(vlm.hf_model.config, "flipscope_edit", None)
    if folded:  # a weight edit folded into the checkpoint (`flipscope.interventions.weight_edit`)
        identity["weight_edit"] = folded
    if vlm.adapter is not None:
        identity["adapter"] = Path(vlm.adapter).expanduser().resolve().name
    if len(vlm.edits) == 1:
        identity.update(vlm.edits[0].description)
    elif vlm.edits:
        identity["edits"] = [dict(edit.description) for edit in vlm.edits]
    return identity
