"""Training an SAE at any hook of any model flipscope loads, with sae-lens's own trainer.

`site_activations` caches a hook at every real token position of a list of prompts; `train_sae`
trains a JumpReLU SAE (GemmaScope 2's quadratic L0 penalty around a target L0) or a TopK SAE on
them with sae-lens's `SAETrainer`; `save_trained_sae` writes it in sae-lens's format (`cfg.json` +
`sae_weights.safetensors`, `hook_name` set, so `load_sae` and every stage read it); `sae_stats`
measures fraction of variance unexplained, mean L0 and the share of features that never fire.
`flipscope.experiments.site_sae` runs them on a user's questions.

sae-lens's `expected_average_only_in` normalisation is estimated in training and folded into the
weights at the end, so the saved SAE reads raw activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import (
    SAE,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.data.atomic import write_atomic
from flipscope.errors import FlipscopeError
from flipscope.model.hook_points import check_activation_hook

__all__ = [
    "ARCHITECTURES",
    "SAETrainConfig",
    "sae_stats",
    "save_trained_sae",
    "site_activations",
    "train_sae",
]

ARCHITECTURES = ("jumprelu", "topk")
SAE_WEIGHTS = "sae_weights.safetensors"


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """How an SAE is trained.

    Attributes:
        architecture: `jumprelu` (GemmaScope 2's) or `topk`.
        d_sae: Dictionary size.
        target_l0: JumpReLU: the mean L0 the quadratic penalty pulls towards; TopK: k.
        steps: Optimiser steps.
        batch: Activations per step.
        lr: Learning rate (cosine-annealed to a tenth, 5% warm-up).
        init_threshold: JumpReLU thresholds' start, in units of the normalised input.
        held_out: Share of the questions kept apart to measure the SAE on.
        seed: Seed of the initialisation, the batch order and the held-out split.
    """

    architecture: str = "jumprelu"
    d_sae: int = 256
    target_l0: float = 12.0
    steps: int = 2000
    batch: int = 512
    lr: float = 1e-3
    init_threshold: float = 0.01
    held_out: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise FlipscopeError(f"SAE architecture {self.architecture!r} is unknown; expected one of {ARCHITECTURES}")
        for name in ("d_sae", "steps", "batch"):
            if getattr(self, name) < 1:
                raise FlipscopeError(f"SAE {name} {getattr(self, name)} must be at least 1")
        if not self.target_l0 > 0 or not self.lr > 0:
            raise FlipscopeError(f"SAE target_l0 {self.target_l0} and lr {self.lr} must be positive")
        if not 0 < self.held_out < 1:
            raise FlipscopeError(f"held_out {self.held_out} must lie strictly between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(acts: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=generator)
        for start in range(0, len(acts) - batch + 1, batch):
            yield acts[order[start : start + batch]]


def train_sae(
    acts: Float[Tensor, "n_tokens d_model"], cfg: SAETrainConfig, *, hook_name: str, model_name: str
) -> JumpReLUTrainingSAE | TopKTrainingSAE:
    """Train an SAE on `acts` with sae-lens's `SAETrainer` (deterministic given `cfg.seed`)."""
    if len(acts) < cfg.batch:
        raise FlipscopeError(f"{len(acts)} activations are fewer than one batch of {cfg.batch}; give more prompts")
    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name)
    common = {"d_in": int(acts.shape[1]), "d_sae": cfg.d_sae, "normalize_activations": "expected_average_only_in"}
    if cfg.architecture == "jumprelu":
        sae_cfg = JumpReLUTrainingSAEConfig(
            **common,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=cfg.target_l0,
            l0_coefficient=1.0,
            jumprelu_init_threshold=cfg.init_threshold,
            jumprelu_bandwidth=0.1,
            # Anthropic's pre-activation loss pulls dead features back above threshold; at 1e-3 it
            # kept the share of dead features on held-out tokens under 20% on the default organism.
            pre_act_loss_coefficient=1e-3,
            metadata=metadata,
        )
        torch.manual_seed(cfg.seed)
        training_sae: Any = JumpReLUTrainingSAE(sae_cfg)
    else:
        torch.manual_seed(cfg.seed)
        topk = TopKTrainingSAEConfig(**common, k=max(1, round(cfg.target_l0)), metadata=metadata)
        training_sae = TopKTrainingSAE(topk)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch,
        train_batch_size_samples=cfg.batch,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=cfg.steps // 20,
        device="cpu",
        dead_feature_window=max(1, cfg.steps // 4),
        feature_sampling_window=max(1, cfg.steps // 4),
        n_batches_for_norm_estimate=20,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=_batches(acts, cfg.batch, cfg.seed))
    return trainer.fit()


def save_trained_sae(trained: Any, directory: str | Path, *, half: bool = False) -> SAE:
    """Write the inference SAE in sae-lens's format and load it back through the user's path.

    With `half` the weights are stored in float16 (a 2,048 × 640 dictionary in float32 is over
    10 MB); `cfg.json` keeps float32, so sae-lens loads them back as float32.
    """
    trained.save_inference_model(directory)
    if half:
        weights = Path(directory) / SAE_WEIGHTS
        write_atomic(weights, save({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}))
    return SAE.load_from_disk(str(directory), device="cpu")


@torch.no_grad()
def sae_stats(sae: SAE, acts: Float[Tensor, "n_tokens d_model"]) -> dict[str, float]:
    """Fraction of variance unexplained, mean L0 and share of dead features on `acts`."""
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    fvu = float(((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
    l0 = float((feats > 0).float().sum(-1).mean())
    dead = float(((feats > 0).sum(0) == 0).float().mean())
    return {"fvu": fvu, "l0": l0, "dead_share": dead, "n_tokens": int(len(acts))}


@torch.no_grad()
def site_activations(
    vlm: Any, specs: Sequence[Any], hook: str, *, batch_size: int = 32, progress: bool = True
) -> Float[Tensor, "n_tokens d_model"]:
    """Activations at `hook` at every real token position of `specs`' prompts (padding dropped)."""
    check_activation_hook(vlm, hook)
    chunks: list[Tensor] = []
    for start in tqdm(range(0, len(specs), batch_size), desc=f"caching {hook}", disable=not progress):
        batch = vlm.prompts.build(list(specs[start : start + batch_size]))
        cache = vlm.cache_activations(batch, names_filter=hook)
        chunks.append(cache[hook][batch.attention_mask.bool().to(cache[hook].device)].float().cpu())
    return torch.cat(chunks)
