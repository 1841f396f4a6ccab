"""The organism's SAE: a JumpReLU SAE (as GemmaScope 2) on one layer's residual stream, trained
with sae-lens's own `SAETrainer` on activations of the organism's prompt distribution.

Activations are taken at every real (non-pad) token position of prompts drawn by the same
generative story as training (`flipscope.organism.data`), image tokens included. sae-lens's
`expected_average_only_in` normalisation is estimated during training and folded into the
weights at the end, so the saved SAE reads raw residual-stream activations. The result is saved
in sae-lens's on-disk format (`cfg.json` + `sae_weights.safetensors`, `hook_name` set) and loads
with `sae_lens.SAE.load_from_disk`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE, JumpReLUSAE, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save
from torch import Tensor

from flipscope.data.atomic import write_atomic
from flipscope.model.hooked import HookedVLM
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import sample_examples

__all__ = [
    "collect_activations",
    "generated_text_activations",
    "sae_stats",
    "save_sae",
    "skip_activations",
    "train_sae",
]

logger = logging.getLogger(__name__)

SAE_WEIGHTS = "sae_weights.safetensors"


def _real_tokens(mask: Tensor, drop_first: bool) -> Tensor:
    """The attention mask as booleans, without each row's first real token when `drop_first`
    (a pretrained model's BOS residual is an outlier hundreds of times the norm of the rest)."""
    keep = mask.bool()
    if drop_first:
        keep[torch.arange(len(keep)), keep.int().argmax(1)] = False
    return keep


@torch.no_grad()
def collect_activations(
    vlm: HookedVLM,
    cfg: OrganismConfig,
    rng: np.random.Generator,
    n_prompts: int,
    batch_size: int = 128,
    *,
    drop_first: bool = False,
) -> Float[Tensor, "n_tokens d_model"]:
    """Residual-stream activations at `cfg.sae_hook`, every real token of `n_prompts` prompts."""
    chunks: list[Tensor] = []
    for start in range(0, n_prompts, batch_size):
        examples = sample_examples(cfg, rng, min(batch_size, n_prompts - start))
        batch = vlm.prompts.build([e.spec for e in examples])
        _, cache = vlm.run_with_cache(batch, names_filter=cfg.sae_hook, logits_to_keep=1)
        chunks.append(cache[cfg.sae_hook][_real_tokens(batch.attention_mask, drop_first)])
    return torch.cat(chunks)


def skip_activations(cfg: OrganismConfig, rng: np.random.Generator, n_prompts: int, batch_size: int = 128) -> None:
    """Advance `rng` exactly as `collect_activations` of `n_prompts` would, without running the
    model: the draws that come after (the SAE's held-out prompts) are then the build's."""
    for start in range(0, n_prompts, batch_size):
        sample_examples(cfg, rng, min(batch_size, n_prompts - start))


@torch.no_grad()
def generated_text_activations(
    vlm: HookedVLM, cfg: OrganismConfig, n_texts: int, n_tokens: int, top_k: int = 50
) -> Float[Tensor, "n_tokens d_model"]:
    """Activations at `cfg.sae_hook` on ordinary text the model writes itself: `n_texts`
    continuations of BOS alone, `n_tokens` each, top-`top_k` sampled (seeded by `cfg.seed`) with
    the KV cache. Text the model finds likely is the distribution a real SAE is trained on;
    prompts alone would give a dictionary of the prompt templates."""
    model = vlm.hf_model
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.full((n_texts, 1), vlm.processor.tokenizer.bos_token_id)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    tokens = [ids]
    for _ in range(n_tokens):
        top = out.logits[:, -1].float().topk(top_k, dim=-1)
        tokens.append(top.indices.gather(1, torch.multinomial(top.values.softmax(-1), 1, generator=generator)))
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    _, cache = vlm.run_with_cache({"input_ids": torch.cat(tokens, 1)}, names_filter=cfg.sae_hook, logits_to_keep=1)
    return cache[cfg.sae_hook][:, 1:].flatten(0, 1)


def _batches(acts: Tensor, batch: int, seed: int) -> Iterator[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=generator)
        for start in range(0, len(acts) - batch + 1, batch):
            yield acts[order[start : start + batch]]


def train_sae(acts: Float[Tensor, "n_tokens d_model"], cfg: OrganismConfig) -> JumpReLUTrainingSAE:
    """Train a JumpReLU SAE (GemmaScope 2's quadratic L0 penalty around `cfg.sae_target_l0`)."""
    sae_cfg = JumpReLUTrainingSAEConfig(
        d_in=int(acts.shape[1]),
        d_sae=cfg.d_sae,
        normalize_activations="expected_average_only_in",
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=cfg.sae_target_l0,
        l0_coefficient=1.0,
        jumprelu_init_threshold=cfg.sae_init_threshold,
        jumprelu_bandwidth=0.1,
        # Anthropic's pre-activation loss pulls dead features back above threshold; at 1e-3 it
        # kept the share of dead features on held-out tokens under 20% on the default organism.
        pre_act_loss_coefficient=1e-3,
        metadata=SAEMetadata(hook_name=cfg.sae_hook, model_name="flipscope-organism"),
    )
    torch.manual_seed(cfg.seed)
    training_sae = JumpReLUTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.sae_steps * cfg.sae_batch,
        train_batch_size_samples=cfg.sae_batch,
        lr=cfg.sae_lr,
        lr_end=cfg.sae_lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=cfg.sae_steps // 20,
        device="cpu",
        dead_feature_window=cfg.sae_steps // 4,
        feature_sampling_window=cfg.sae_steps // 4,
        n_batches_for_norm_estimate=20,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=_batches(acts, cfg.sae_batch, cfg.seed))
    return trainer.fit()


def save_sae(trained: JumpReLUTrainingSAE, directory: str | Path, *, half: bool = False) -> JumpReLUSAE:
    """Write the inference SAE in sae-lens's format and load it back through the user's path.

    With `half` the weights are stored in float16 (a 2,048 × 640 dictionary in float32 is over
    10 MB); `cfg.json` keeps float32, so sae-lens loads them back as float32.
    """
    trained.save_inference_model(directory)
    if half:
        weights = Path(directory) / SAE_WEIGHTS
        write_atomic(weights, save({k: v.half().contiguous() for k, v in load_file(str(weights)).items()}))
    loaded = SAE.load_from_disk(str(directory), device="cpu")
    assert isinstance(loaded, JumpReLUSAE)
    return loaded


@torch.no_grad()
def sae_stats(sae: JumpReLUSAE, acts: Float[Tensor, "n_tokens d_model"]) -> dict[str, float]:
    """Fraction of variance unexplained, mean L0 and share of dead features on `acts`."""
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    fvu = float(((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())
    l0 = float((feats > 0).float().sum(-1).mean())
    dead = float(((feats > 0).sum(0) == 0).float().mean())
    return {"fvu": fvu, "l0": l0, "dead_share": dead, "n_tokens": int(len(acts))}
