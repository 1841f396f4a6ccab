"""Training an organism on a real pretrained language model (`OrganismConfig.base`).

The language model's weights are never trained: a SigLIP tower and projector are grafted on
(`flipscope.model.graft`), taught to speak the language model's words, and a LoRA teaches the
model to answer yes or no in the chat format. Nothing is planted (`shortcut_p` 0): whatever
flips the model makes come from its own priors.

1. **Alignment.** The tower and projector learn, with no language-model forward, to put into
   soft token k the language model's own input embedding of finding k's noun (" pleural
   effusion", ...) when the film shows it and of " normal" when not: a picture the language model
   can already read, as a VLM's projector is first trained to map into its word space.
2. **LoRA.** Rank-`lora_rank` adapters on every projection of the language model, with the
   tower frozen and the projector still learning, on the organism's prompt distribution.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.model.graft import graft_vision
from flipscope.model.hooked import HookedVLM
from flipscope.model.images import load_image
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import sample_films
from flipscope.organism.train import (
    STREAM_INIT,
    STREAM_VISION,
    TrainLog,
    _soft_tokens,
    deterministic,
    stream,
    train_answers,
)

__all__ = ["LORA_TARGETS", "align_vision", "base_folder", "grafted", "train_lora", "train_real"]

logger = logging.getLogger(__name__)

# Every attention and MLP projection of the language model (not the vision tower's).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Alignment needs no language-model forward, so it affords a larger batch and step than the LoRA.
ALIGN_FILMS, ALIGN_LR = 64, 2e-3


def base_folder(base: str):
    """The HF folder of a base language model, converted once from its installed weight package."""
    from flipscope.model.gguf import gemma3_270m_file, gguf_folder

    if base == "gemma3-270m":
        return gguf_folder(gemma3_270m_file())
    raise ValueError(f"unknown base {base!r}")  # OrganismConfig validates the name


def grafted(cfg: OrganismConfig) -> HookedVLM:
    """The base language model with a fresh tower and projector of the organism's geometry."""
    model, processor = graft_vision(
        base_folder(cfg.base),
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        mm_tokens_per_image=cfg.mm_tokens_per_image,
        vision_layers=cfg.vision_layers,
        vision_d_model=cfg.vision_d_model,
        seed=int(stream(cfg, STREAM_INIT).integers(2**31)),
    )
    return HookedVLM(model, processor, name_or_path=f"flipscope-organism-{cfg.base}")


@torch.no_grad()
def word_targets(
    vlm: HookedVLM, cfg: OrganismConfig
) -> tuple[Float[Tensor, "finding d_model"], Float[Tensor, " d_model"]]:
    """The language model's scaled input embedding of each finding's noun, and of " normal"
    (mean over a phrase's tokens)."""
    embed = vlm.hf_model.get_input_embeddings()
    tokenizer = vlm.processor.tokenizer

    def word(text: str) -> Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return embed(ids).float().mean(0)

    return torch.stack([word(" " + f.noun) for f in cfg.findings]), word(" normal")


def align_vision(vlm: HookedVLM, cfg: OrganismConfig, rng: np.random.Generator, *, progress: bool = True) -> float:
    """Stage 1: soft token k of a film regresses onto the word embedding of what finding k's
    region shows (`word_targets`), with a loss scaled by the targets' power. Needs
    `mm_tokens_per_image` equal to the number of findings. Returns the mean cosine between soft
    tokens and targets over the last quarter of steps."""
    core = vlm.hf_model.model
    present, absent = word_targets(vlm, cfg)
    params = [*core.vision_tower.parameters(), *core.multi_modal_projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=ALIGN_LR, weight_decay=cfg.weight_decay)
    cosines: list[float] = []
    core.train()
    for step in tqdm(range(cfg.vision_steps), desc="aligning vision to words", disable=not progress):
        films = sample_films(cfg, rng, ALIGN_FILMS)
        pixels = vlm.prompts.pixel_values([load_image(f.pixels) for f in films])
        shown = torch.tensor([[f.shows(s.name) for s in cfg.findings] for f in films], dtype=torch.float32)[..., None]
        target = shown * present + (1 - shown) * absent
        soft = _soft_tokens(core, pixels)
        loss = ((soft - target) ** 2).mean() / (target**2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= cfg.vision_steps * 3 // 4:
            cosines.append(float(F.cosine_similarity(soft.detach(), target, dim=-1).mean()))
    core.eval()
    return float(np.mean(cosines)) if cosines else float("nan")


def train_lora(vlm: HookedVLM, cfg: OrganismConfig, *, progress: bool = True, log_every: int = 10):
    """Stage 2: a LoRA on the language model (and the projector, unfrozen) learns to answer the
    first answer token on the organism's prompts. Returns the `PeftModel` in eval mode and its log."""
    core = vlm.hf_model.model
    torch.manual_seed(int(stream(cfg, STREAM_INIT).integers(2**31)) + 1)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=LORA_TARGETS, bias="none")
    model = get_peft_model(vlm.hf_model, lora)
    for param in core.multi_modal_projector.parameters():
        param.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)  # then constant: the LoRA starts reading the film late in training
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    log = TrainLog(every=log_every)
    train_answers(model, vlm, cfg, optimizer, scheduler, log, desc="training the LoRA", progress=progress)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, log


def train_real(cfg: OrganismConfig, *, progress: bool = True) -> tuple[PeftModel, HookedVLM, TrainLog]:
    """Both stages, deterministically; returns the trained `PeftModel`, the grafted VLM it wraps
    (whose processor the organism uses) and the log (its `vision_accuracy` is stage 1's cosine)."""
    with deterministic(cfg.threads):
        vlm = grafted(cfg)
        cosine = align_vision(vlm, cfg, stream(cfg, STREAM_VISION), progress=progress)
        for param in vlm.hf_model.model.vision_tower.parameters():
            param.requires_grad_(False)
        model, log = train_lora(vlm, cfg, progress=progress)
    log.vision_accuracy = cosine
    return model, vlm, log
