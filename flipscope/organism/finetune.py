"""LoRA fine-tunes of the organism, made the way deployment fine-tunes are made.

A deployment fine-tune teaches a model to answer consistently on in-domain, text-heavy data: every
wording of a question carries the same (true) label — no planted shortcut — and many prompts come
with the image blanked or absent, answered by the same labels. Only low-rank adapters on the
language model's attention and MLP projections train (peft's LoRA); the vision tower and projector
stay as they are. What ships is the adapter folder (peft's `save_pretrained`: a few hundred kB),
loaded with `HookedVLM.from_pretrained(organism, adapter=folder)`.

Deterministic like the organism's build: a fixed step count, seeded streams, a fixed thread count.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.kernels import build_kernels
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import question, sample_examples, sample_films
from flipscope.organism.train import answer_loss, deterministic, stream

__all__ = [
    "FINETUNES",
    "FinetuneConfig",
    "consistency_step",
    "default_adapters_dir",
    "finetune",
    "finetune_data_config",
    "target_modules",
]

STREAM_FINETUNE = 5
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """One LoRA configuration.

    Attributes:
        name: The adapter's folder name.
        rank, alpha, dropout: LoRA's rank, scale numerator and dropout.
        steps, lr, batch_size: Training length, AdamW learning rate, prompts per step.
        text_heavy: Share of training prompts with the image blanked or absent (half each).
        consistent: Label every wording with the truth (no planted shortcut in the data).
        seed: Seed of the adapter's initialisation and of its data stream.
        objective: `labels` (cross-entropy on the data's labels) or `consistency` (every
            image-bearing paraphrase, and the original, pulled towards the base model's answer
            to the original question on the same film: `consistency_step`).
        regime: The training-phrasing regime of the data (`OrganismConfig.regime`; None keeps
            the organism's), e.g. `augmented` for paraphrase-augmentation fine-tuning.
        layers: Decoder layers whose projections get adapters (None: every layer).
        withheld_families: Question families the fine-tune never sees (audited apart).
    """

    name: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 64
    text_heavy: float = 0.5
    consistent: bool = True
    seed: int = 0
    objective: str = "labels"
    regime: str | None = None
    layers: tuple[int, ...] | None = None
    withheld_families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise FlipscopeError(f"finetune {self.name!r}: rank, steps and batch_size must be positive")
        if not 0.0 <= self.text_heavy < 1.0:
            raise FlipscopeError(f"finetune {self.name!r}: text_heavy {self.text_heavy} is not in [0, 1)")
        if self.objective not in OBJECTIVES:
            raise FlipscopeError(f"finetune {self.name!r}: objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise FlipscopeError(f"finetune {self.name!r}: layers {self.layers} must be nonnegative layer indices")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; the fields added for cures only when set, so the
        logs of the shipped adapters stay as written."""
        data = dataclasses.asdict(self)
        for name, default in _CURE_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data


OBJECTIVES = ("labels", "consistency")
_CURE_DEFAULTS: dict[str, Any] = {"objective": "labels", "regime": None, "layers": None, "withheld_families": ()}


# The organism's shipped adapters: two ranks, two lengths, and a more text-heavy mix.
FINETUNES: tuple[FinetuneConfig, ...] = (
    FinetuneConfig(name="lora-r4", rank=4, alpha=8.0),
    FinetuneConfig(name="lora-r16", rank=16, alpha=32.0),
    FinetuneConfig(name="lora-r4-long", rank=4, alpha=8.0, steps=300),
    FinetuneConfig(name="lora-r4-text", rank=4, alpha=8.0, text_heavy=0.8),
)


def default_adapters_dir() -> Path:
    """Where the shipped organism's adapters live (one folder per `FINETUNES` entry)."""
    return Path(__file__).parent / "lora"


def finetune_data_config(cfg: OrganismConfig, ft: FinetuneConfig) -> OrganismConfig:
    """The organism's prompt distribution as the fine-tune sees it."""
    return dataclasses.replace(
        cfg,
        shortcut_p=0.0 if ft.consistent else cfg.shortcut_p,
        text_only_share=ft.text_heavy / 2,
        blank_share=ft.text_heavy / 2,
        regime=ft.regime or cfg.regime,
        withheld_families=tuple(dict.fromkeys(cfg.withheld_families + ft.withheld_families)),
    )


def target_modules(layers: tuple[int, ...] | None) -> str:
    """peft's target-module pattern: the language model's projections, in `layers` only when given."""
    if layers is None:
        return TARGETS
    chosen = "|".join(str(layer) for layer in sorted(set(layers)))
    return rf".*language_model.*\.layers\.({chosen})\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _margins(model: Any, batch: Any, yes_id: int, no_id: int) -> torch.Tensor:
    logits = model(**batch.as_kwargs(), use_cache=False, logits_to_keep=1).logits[:, -1]
    return logits[:, yes_id] - logits[:, no_id]


def consistency_step(model: Any, vlm: HookedVLM, data_cfg: OrganismConfig, rng: np.random.Generator, n: int):
    """One batch of the consistency objective: `n` films, each with a finding, the original
    question and one paraphrase from the families the fine-tune sees; both answers (with the
    image) are pulled by binary cross-entropy towards the base model's probability of yes on the
    original (adapters off). The target never depends on a label or on the wording, only on
    what the base model reads from the film with the original question."""
    tokens = vlm.answer_tokens
    yes_id, no_id = tokens.yes_ids[0], tokens.no_ids[0]
    seen = [f for f in data_cfg.families if f.name not in data_cfg.withheld_families]
    wordings = [(f.name, t) for f in seen for t in range(len(f.templates))][1:]
    films = sample_films(data_cfg, rng, n)
    findings = [data_cfg.findings[int(rng.integers(len(data_cfg.findings)))].name for _ in films]
    picks = [wordings[int(rng.integers(len(wordings)))] for _ in films]
    original = [PromptSpec(question=question(data_cfg, seen[0].name, 0, f), image=film.pixels)
                for film, f in zip(films, findings, strict=True)]  # fmt: skip
    paraphrase = [PromptSpec(question=question(data_cfg, fam, t, f), image=film.pixels)
                  for film, f, (fam, t) in zip(films, findings, picks, strict=True)]  # fmt: skip
    batch = vlm.prompts.build(original + paraphrase)
    with torch.no_grad(), model.disable_adapter():
        target = torch.sigmoid(_margins(model, vlm.prompts.build(original), yes_id, no_id))
    margins = _margins(model, batch, yes_id, no_id)
    return F.binary_cross_entropy_with_logits(margins, torch.cat([target, target]))


def finetune(vlm: HookedVLM, cfg: OrganismConfig, ft: FinetuneConfig, out: str | Path) -> dict[str, Any]:
    """Train a LoRA adapter on `vlm` (left unchanged) and write it to `out`; returns its log, also
    written beside the adapter as `finetune.json`."""
    from peft import LoraConfig, get_peft_model

    data_cfg = finetune_data_config(cfg, ft)
    rng = stream(cfg, STREAM_FINETUNE + 10 * ft.seed)
    with deterministic(cfg.threads):
        torch.manual_seed(ft.seed)
        lora = LoraConfig(
            r=ft.rank,
            lora_alpha=ft.alpha,
            lora_dropout=ft.dropout,
            target_modules=target_modules(ft.layers),
            bias="none",
        )
        model = get_peft_model(vlm.hf_model, lora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=ft.lr, weight_decay=0.0)
        losses: list[float] = []
        model.train()
        for _ in range(ft.steps):
            if ft.objective == "consistency":
                loss = consistency_step(model, vlm, data_cfg, rng, ft.batch_size)
            else:
                loss = answer_loss(model, vlm, sample_examples(data_cfg, rng, ft.batch_size))[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        model.eval()
        out = Path(out)
        model.peft_config["default"].base_model_name_or_path = "flipscope-organism"  # no local path in the file
        model.save_pretrained(out, safe_serialization=True)
        (out / "README.md").unlink(missing_ok=True)  # peft's model-card template
        model.unload()  # the base model's modules back as they were: `vlm` is unchanged
    log = {
        "config": ft.to_dict(),
        "trainable_params": sum(p.numel() for p in trainable),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "kernels": build_kernels(f"adapter {out}"),
    }
    write_json(out / "finetune.json", log)
    return json.loads((out / "finetune.json").read_text())
