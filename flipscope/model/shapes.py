"""Random models at MedGemma 4B's real shapes, and a random GemmaScope 2 SAE for them.

MedGemma's weights cannot be downloaded here, but its cost can be measured: memory of the
attribution backward, an SAE at every position while clamping, bf16 margins and the fast path's
equality in bf16 all depend on shapes, not on trained values. `medgemma_4b_config` is MedGemma
4B's configuration (google/medgemma-4b-it `config.json`) at a chosen depth with the tiny word-level
tokenizer (its 262,208-row vocabulary kept, so the unembedding costs what it costs there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from flipscope.data.atomic import write_json
from flipscope.model.tiny import TinyVLMConfig

__all__ = ["MEDGEMMA_4B", "centre_answer_readout", "medgemma_4b_config", "save_random_gemmascope_sae"]

MEDGEMMA_4B = {
    "text_layers": 34,
    "d_model": 2560,
    "d_mlp": 10240,
    "n_heads": 8,
    "n_kv_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "global_every": 6,
    "rope_global": 1_000_000.0,
    "rope_local": 10_000.0,
    "rope_scaling": 8.0,
    "max_positions": 131_072,
    "vocab_size": 262_208,
    "vision_layers": 27,
    "vision_d_model": 1152,
    "vision_d_mlp": 4304,
    "vision_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "mm_tokens_per_image": 256,
}


def medgemma_4b_config(
    words: Sequence[str], *, depth: int = 34, vision_depth: int | None = None, seed: int = 0
) -> TinyVLMConfig:
    """MedGemma 4B's shapes with `depth` decoder layers and `vision_depth` SigLIP layers (default:
    the same share of the tower's 27 as `depth` is of 34, at least one). Full depth is the real
    layer pattern except that the last layer attends globally, as it does in any cut-short model."""
    if not 1 <= depth <= 34:
        raise ValueError(f"depth {depth}: MedGemma 4B has 1..34 decoder layers")
    vision_depth = vision_depth if vision_depth is not None else max(1, math.ceil(27 * depth / 34))
    shape = {**MEDGEMMA_4B, "text_layers": depth, "vision_layers": vision_depth}
    return TinyVLMConfig(words=tuple(words), perturb_norms=False, seed=seed, **shape)  # type: ignore[arg-type]


def save_random_gemmascope_sae(
    folder: str | Path, *, d_in: int, layer: int, d_sae: int = 16_384, l0: float = 64.0, seed: int = 0
) -> Path:
    """A random JumpReLU SAE written as GemmaScope 2 ships one (`params.safetensors` with w_enc,
    w_dec, b_enc, b_dec, threshold, and `config.json`) under `folder/resid_post/layer_{L}_width_{k}k_l0_medium`.

    Unit-norm decoder rows, the encoder their transpose, and thresholds set so that about `l0`
    features fire on a unit-variance input: an SAE whose cost (every position, every feature) is
    a real one's.
    """
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - l0 / d_sae)).item()
    tensors = {
        "w_enc": w_dec.T.contiguous(),
        "w_dec": w_dec,
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
        "threshold": torch.full((d_sae,), z),
    }
    out = Path(folder) / "resid_post" / f"layer_{layer}_width_{d_sae // 1024}k_l0_medium"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "params.safetensors")
    hf_hook = f"model.language_model.layers.{layer}.output"
    config = {"architecture": "jump_relu", "width": d_sae, "l0": l0, "type": "sae"}
    write_json(out / "config.json", {**config, "hf_hook_point_in": hf_hook, "hf_hook_point_out": hf_hook})
    return out


def centre_answer_readout(
    model: torch.nn.Module,
    yes_ids: Sequence[int],
    no_ids: Sequence[int],
    hidden: Float[Tensor, "prompt d_model"],
    *,
    spread: float = 1.0,
    seed: int = 0,
) -> None:
    """Put a random model at its decision boundary, as a real model's hard cases are.

    A random model answers every prompt alike (its last token is the same template token, so the
    final states share one large component) and has no flips to study. Here every yes row of the
    (tied) unembedding becomes `base + d/2` and every no row `base - d/2`, with `d` a random
    direction orthogonal to the mean of `hidden` (final-norm states at the last position of
    sample prompts), scaled so the margins over them have standard deviation `spread` around 0.
    """
    gen = torch.Generator().manual_seed(seed)
    mean = hidden.float().mean(dim=0)
    direction = torch.randn(hidden.shape[1], generator=gen)
    direction -= (direction @ mean) / (mean @ mean) * mean
    direction *= spread / ((hidden.float() - mean) @ direction).std().clamp_min(1e-12)
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        ids = [*yes_ids, *no_ids]
        base = weight[ids].float().mean(dim=0)
        weight[list(yes_ids)] = (base + direction / 2).to(weight.dtype)
        weight[list(no_ids)] = (base - direction / 2).to(weight.dtype)
