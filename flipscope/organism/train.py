"""Training the organism: a small Gemma 3 VLM learns to answer the first answer token.

Deterministic by construction: a fixed step count (never a time limit), separate seeded streams
for initialisation and data, a fixed thread count and `torch.use_deterministic_algorithms(True)`
(the thread count changes the bits), so two builds on one machine give identical weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.model.hooked import HookedVLM
from flipscope.model.images import load_image
from flipscope.model.tiny import TinyVLMConfig, build_tiny_vlm
from flipscope.model.tiny_families import build_llava
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Example, sample_examples, sample_films, vocabulary

__all__ = ["TrainLog", "answer_loss", "deterministic", "train_answers", "train_model"]

logger = logging.getLogger(__name__)

# Stream ids under the root seed; each stage draws from its own generator.
STREAM_INIT, STREAM_TRAIN, STREAM_TEST, STREAM_SAE, STREAM_VISION = 0, 1, 2, 3, 4


def stream(cfg: OrganismConfig, which: int) -> np.random.Generator:
    """The seeded generator of one stage (initialisation, training data, test set, SAE data)."""
    return np.random.default_rng([cfg.seed, which])


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """A fixed thread count and deterministic kernels for the duration (the thread count changes
    the bits of CPU reductions, so it is part of a build's settings); restores the previous ones."""
    previous_threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(previous_threads)


@dataclass
class TrainLog:
    """Stage-1 finding accuracy of the vision tower, then loss and accuracy on the training
    stream every `every` steps."""

    every: int
    vision_accuracy: float = float("nan")
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# The model sizes, named alike in OrganismConfig and TinyVLMConfig (the rest keep the tiny defaults).
_SIZE_FIELDS = tuple(
    f.name
    for f in fields(TinyVLMConfig)
    if f.name in OrganismConfig.__dataclass_fields__ and f.name not in ("words", "vocab_size", "perturb_norms", "seed")
)  # the organism's vocabulary is its own words


def build_untrained(cfg: OrganismConfig) -> HookedVLM:
    """The organism's architecture with fresh weights (projector re-drawn, norms at unit scale).

    A `llava` organism's CLIP patch is sized so that its language model sees the same
    `mm_tokens_per_image` soft tokens (one per patch) as the Gemma 3 one sees after pooling, and
    its projector reads CLIP's last layer (a two-layer tower has no second-to-last worth reading).
    """
    sizes = {name: getattr(cfg, name) for name in _SIZE_FIELDS}
    seed = int(stream(cfg, STREAM_INIT).integers(2**31))
    if cfg.family == "llava":
        sizes["patch_size"] = cfg.image_size // math.isqrt(cfg.mm_tokens_per_image)
    tiny = TinyVLMConfig(words=vocabulary(cfg), perturb_norms=False, seed=seed, **sizes)
    model, processor = build_llava(tiny, vision_feature_layer=-1) if cfg.family == "llava" else build_tiny_vlm(tiny)
    return HookedVLM(model, processor, name_or_path="flipscope-organism")


def _soft_tokens(core: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[film, soft token, d_model]: the projector's output, as the language model receives it."""
    out = core.get_image_features(pixels, return_dict=True).pooler_output
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def pretrain_vision(vlm: HookedVLM, cfg: OrganismConfig, rng: np.random.Generator, *, progress: bool = True) -> float:
    """Stage 1: train the SigLIP tower to detect each finding, as a VLM's vision encoder is
    pretrained before the language model learns to read it.

    A temporary linear head reads the mean of the image soft tokens (the projector's output, as
    the language model receives them) and predicts each finding, trained with binary
    cross-entropy and then discarded. Reading the mean teaches the tower, whose attention is
    global, to put a finding into every soft token, so that the language model can find it
    without first learning where to look. Returns the head's accuracy over the last quarter of
    steps.
    """
    core = vlm.hf_model.model
    head = torch.nn.Linear(vlm.d_model, len(cfg.findings))
    params = [*core.vision_tower.parameters(), *core.multi_modal_projector.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    hits, seen = 0, 0
    core.train()
    for step in tqdm(range(cfg.vision_steps), desc="pretraining vision", disable=not progress):
        films = sample_films(cfg, rng, cfg.batch_size)
        pixels = vlm.prompts.pixel_values([load_image(f.pixels) for f in films])
        truth = torch.tensor([[f.shows(spec.name) for spec in cfg.findings] for f in films], dtype=torch.float32)
        logits = head(_soft_tokens(core, pixels).mean(dim=1))
        loss = F.binary_cross_entropy_with_logits(logits, truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= cfg.vision_steps * 3 // 4:
            hits += int(((logits > 0) == truth.bool()).sum())
            seen += truth.numel()
    core.eval()
    return hits / max(seen, 1)


def answer_loss(
    model: torch.nn.Module, vlm: HookedVLM, examples: Sequence[Example]
) -> tuple[Float[Tensor, ""], Float[Tensor, "batch vocab"], Int[Tensor, " batch"]]:
    """Cross-entropy of the first answer token at the last prompt position of `examples` (`model`
    is `vlm`'s HF model or a PEFT wrapper of it), with the logits and targets it was taken on."""
    yes_id, no_id = vlm.answer_tokens.yes_ids[0], vlm.answer_tokens.no_ids[0]
    batch = vlm.prompts.build([e.spec for e in examples])
    logits = model(**batch.as_kwargs(), use_cache=False, logits_to_keep=1).logits[:, -1].float()
    targets = torch.tensor([yes_id if e.label else no_id for e in examples])
    return F.cross_entropy(logits, targets), logits, targets


def train_answers(
    model: torch.nn.Module,
    vlm: HookedVLM,
    cfg: OrganismConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    log: TrainLog,
    *,
    desc: str,
    progress: bool = True,
) -> None:
    """Answer training, as every organism does it: `cfg.steps` steps of `answer_loss` on the
    training stream, gradients clipped to norm 1 over what `optimizer` trains, the mean loss and
    accuracy of each `log.every` steps appended to `log`; leaves `model` in eval mode."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    yes_id, no_id = vlm.answer_tokens.yes_ids[0], vlm.answer_tokens.no_ids[0]
    rng = stream(cfg, STREAM_TRAIN)
    window = [0.0, 0, 0]  # loss sum, hits, examples since the last entry
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for step in bar:
        examples = sample_examples(cfg, rng, cfg.batch_size)
        loss, logits, targets = answer_loss(model, vlm, examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        window[0] += float(loss.detach()) * len(examples)
        window[1] += int((logits[:, yes_id] > logits[:, no_id]).eq(targets == yes_id).sum())
        window[2] += len(examples)
        if (step + 1) % log.every == 0:
            log.loss.append(window[0] / window[2])
            log.accuracy.append(window[1] / window[2])
            bar.set_postfix(loss=f"{log.loss[-1]:.3f}", acc=f"{log.accuracy[-1]:.3f}")
            window = [0.0, 0, 0]
    model.eval()


def train_model(cfg: OrganismConfig, *, progress: bool = True, log_every: int = 50) -> tuple[HookedVLM, TrainLog]:
    """Build and train the organism's model; returns it in eval mode with its training log.

    Stage 1 pretrains the vision tower and projector (`pretrain_vision`); stage 2 trains the
    language model on the prompt distribution with them frozen, so that noisy early gradients
    from the language model cannot wash out the finding features it has to learn to read.
    """
    with deterministic(cfg.threads):
        vlm = build_untrained(cfg)
        log_vision = pretrain_vision(vlm, cfg, stream(cfg, STREAM_VISION), progress=progress)
        model = vlm.hf_model
        core = model.model
        frozen = [*core.vision_tower.parameters(), *core.multi_modal_projector.parameters()]
        for param in frozen:
            param.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg.steps))
        log = TrainLog(every=log_every, vision_accuracy=log_vision)
        train_answers(model, vlm, cfg, optimizer, scheduler, log, desc="training organism", progress=progress)
        for param in frozen:
            param.requires_grad_(True)
    return vlm, log
