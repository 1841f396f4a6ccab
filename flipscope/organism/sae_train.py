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

from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import JumpReLUSAE, JumpReLUTrainingSAE
from torch import Tensor

from flipscope.model.hooked import HookedVLM
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import sample_examples
from flipscope.sae.train import SAETrainConfig, sae_stats, save_trained_sae
from flipscope.sae.train import train_sae as train_dictionary

__all__ = [
    "collect_activations",
    "generated_text_activations",
    "sae_stats",
    "save_sae",
    "skip_activations",
    "train_sae",
]


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
    hook: str | None = None,
) -> Float[Tensor, "n_tokens d_model"]:
    """Activations at `hook` (default `cfg.sae_hook`), every real token of `n_prompts` prompts."""
    hook = hook or cfg.sae_hook
    chunks: list[Tensor] = []
    for start in range(0, n_prompts, batch_size):
        examples = sample_examples(cfg, rng, min(batch_size, n_prompts - start))
        batch = vlm.prompts.build([e.spec for e in examples])
        cache = vlm.cache_activations(batch, names_filter=hook)
        chunks.append(cache[hook][_real_tokens(batch.attention_mask, drop_first)])
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
    cache = vlm.cache_activations({"input_ids": torch.cat(tokens, 1)}, names_filter=cfg.sae_hook)
    return cache[cfg.sae_hook][:, 1:].flatten(0, 1)


def train_sae(
    acts: Float[Tensor, "n_tokens d_model"], cfg: OrganismConfig, *, hook: str | None = None
) -> JumpReLUTrainingSAE:
    """Train the organism's JumpReLU SAE (GemmaScope 2's quadratic L0 penalty around
    `cfg.sae_target_l0`) on activations of `hook` (default `cfg.sae_hook`) with
    `flipscope.sae.train.train_sae`."""
    settings = SAETrainConfig(
        architecture="jumprelu",
        d_sae=cfg.d_sae,
        target_l0=cfg.sae_target_l0,
        steps=cfg.sae_steps,
        batch=cfg.sae_batch,
        lr=cfg.sae_lr,
        init_threshold=cfg.sae_init_threshold,
        seed=cfg.seed,
    )
    return train_dictionary(acts, settings, hook_name=hook or cfg.sae_hook, model_name="flipscope-organism")


def save_sae(trained: JumpReLUTrainingSAE, directory: str | Path, *, half: bool = False) -> JumpReLUSAE:
    """Write the inference SAE in sae-lens's format and load it back (`save_trained_sae`)."""
    loaded = save_trained_sae(trained, directory, half=half)
    assert isinstance(loaded, JumpReLUSAE)
    return loaded
