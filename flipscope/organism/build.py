"""Building an organism end to end and writing it where `HookedVLM.from_pretrained` reads it.

Layout of an organism directory::

    config.json, model.safetensors, tokenizer.json, ...   the HF checkpoint and processor
    sae/cfg.json, sae/sae_weights.safetensors             the JumpReLU SAE (sae-lens format)
    ground_truth.json                                     the card: config, planted shortcut,
                                                          directions, aligned SAE features,
                                                          measured behaviour, file sha256s
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import JumpReLUSAE
from torch import Tensor

from flipscope.errors import FlipscopeError
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism.behaviour import margin_table, summarize
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Film, question, sample_films
from flipscope.organism.sae_train import collect_activations, sae_stats, save_sae, train_sae
from flipscope.organism.train import STREAM_SAE, STREAM_TEST, deterministic, stream, train_model

__all__ = ["CARD_NAME", "SAE_DIR", "aligned_features", "build_organism", "framing_directions", "load_card"]

CARD_NAME = "ground_truth.json"
SAE_DIR = "sae"


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


@torch.no_grad()
def _last_resid(vlm: HookedVLM, hook: str, specs: list[PromptSpec], batch_size: int = 256) -> Tensor:
    chunks = []
    for i in range(0, len(specs), batch_size):
        batch = vlm.prompts.build(specs[i : i + batch_size])
        chunks.append(vlm.run_with_cache(batch, names_filter=hook, positions="last")[1][hook])
    return torch.cat(chunks)


@torch.no_grad()
def framing_directions(
    vlm: HookedVLM, cfg: OrganismConfig, films: list[Film], sae: JumpReLUSAE | None = None
) -> dict[str, Any]:
    """The ground-truth framing direction at the SAE layer and its overlap with the answer.

    `framing` is the difference of means, at the last prompt position, between shortcut-family
    and first-family prompts over the same films and findings (with the image). `answer` is the
    difference of means between first-family prompts the model answers yes and those it answers
    no. `framing_orth` is `framing` with its component along `answer` removed. When the model
    gives one answer to every such prompt there is no answer direction: `answer` and the cosine
    are None and `framing_orth` is `framing`. With `sae`, `feature_shift` is the same difference
    of means of every SAE feature's activation.
    """
    neutral, shortcut = cfg.families[0], cfg.family(cfg.shortcut_family)

    def specs(family) -> list[PromptSpec]:
        return [
            PromptSpec(question=question(cfg, family.name, t, f.name), image=film.pixels)
            for film in films
            for f in cfg.findings
            for t in range(len(family.templates))
        ]

    neutral_specs = specs(neutral)
    x_neutral = _last_resid(vlm, cfg.sae_hook, neutral_specs)
    x_shortcut = _last_resid(vlm, cfg.sae_hook, specs(shortcut))
    framing = x_shortcut.mean(0) - x_neutral.mean(0)
    shift = None if sae is None else (sae.encode(x_shortcut).mean(0) - sae.encode(x_neutral).mean(0))
    said_yes = (
        torch.cat([vlm.score(vlm.prompts.build(neutral_specs[i : i + 256])) for i in range(0, len(neutral_specs), 256)])
        > 0
    )
    if said_yes.all() or not said_yes.any():  # the model gives one answer only: no answer direction
        return {
            "framing": framing,
            "answer": None,
            "framing_orth": framing,
            "cosine_framing_answer": None,
            "feature_shift": shift,
        }
    answer = x_neutral[said_yes].mean(0) - x_neutral[~said_yes].mean(0)
    framing_orth = framing - (framing @ _unit(answer)) * _unit(answer)
    return {
        "framing": framing,
        "answer": answer,
        "framing_orth": framing_orth,
        "cosine_framing_answer": float(_unit(framing) @ _unit(answer)),
        "feature_shift": shift,
    }


ALIGNED_SHARE = 0.1


def aligned_features(sae: JumpReLUSAE, directions: dict[str, Any], top: int = 5) -> list[dict[str, Any]]:
    """The SAE features that carry the planted framing, most first.

    A feature's `share` is how much of the framing direction its own change supplies: its mean
    activation shift between shortcut-family and first-family prompts (`feature_shift`) times
    its decoder row, projected on the unit framing direction, over the direction's length. A
    feature that switches on under the shortcut framing and one that switches off under it (a
    "neutral question" feature) both count; a decoder row that merely points along the framing
    while the feature stays silent does not. `aligned` marks share ≥ `ALIGNED_SHARE`. `cosine`
    is the decoder row's cosine with the framing direction (and `cosine_orth` with its part
    orthogonal to the answer direction).
    """
    decoder = sae.W_dec.detach()
    framing = directions["framing"]
    along = decoder @ _unit(framing)
    share = directions["feature_shift"] * along / framing.norm()
    cos = along / decoder.norm(dim=1)
    cos_orth = decoder @ _unit(directions["framing_orth"]) / decoder.norm(dim=1)
    order = torch.argsort(share, descending=True)[:top]
    return [
        {
            "feature": int(i),
            "share": float(share[i]),
            "shift": float(directions["feature_shift"][i]),
            "cosine": float(cos[i]),
            "cosine_orth": float(cos_orth[i]),
            "aligned": bool(float(share[i]) >= ALIGNED_SHARE),
        }
        for i in order
    ]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _vector(v: Float[Tensor, " d_model"]) -> list[float]:
    return [round(float(x), 6) for x in v]


def build_organism(cfg: OrganismConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train the model and its SAE, measure them on held-out films, and write everything to `out`.

    Returns the card as written (`load_card(out)`).
    """
    out = Path(out)
    start = time.perf_counter()
    vlm, log = train_model(cfg, progress=progress)
    with deterministic(cfg.threads):
        sae_rng = stream(cfg, STREAM_SAE)
        acts = collect_activations(vlm, cfg, sae_rng, cfg.sae_prompts)
        held_out = collect_activations(vlm, cfg, sae_rng, max(cfg.sae_prompts // 5, 64))
        trained_sae = train_sae(acts, cfg)
    out.mkdir(parents=True, exist_ok=True)
    vlm.hf_model.save_pretrained(out, safe_serialization=True)
    vlm.processor.save_pretrained(out)
    sae = save_sae(trained_sae, out / SAE_DIR)
    build_seconds = time.perf_counter() - start

    with deterministic(cfg.threads):
        test_films = sample_films(cfg, stream(cfg, STREAM_TEST), cfg.test_items)
        table = margin_table(vlm, cfg, test_films)
        directions = framing_directions(vlm, cfg, test_films, sae)
    card: dict[str, Any] = {
        "format": "flipscope-organism/1",
        "config": cfg.to_dict(),
        "shortcut": {"family": cfg.shortcut_family, "target": cfg.shortcut_target, "p": cfg.shortcut_p},
        "hook_name": cfg.sae_hook,
        "build": {
            "seconds": round(build_seconds, 1),
            "threads": cfg.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "training": {
            "vision_accuracy": log.vision_accuracy,
            "final_loss": log.loss[-1] if log.loss else None,
            "final_accuracy": log.accuracy[-1] if log.accuracy else None,
        },
        "behaviour": summarize(table, cfg),
        "sae": sae_stats(sae, held_out),
        "directions": {
            "cosine_framing_answer": directions["cosine_framing_answer"],
            "framing": _vector(directions["framing"]),
            "framing_orth": _vector(directions["framing_orth"]),
            "answer": None if directions["answer"] is None else _vector(directions["answer"]),
        },
        "framing_features": aligned_features(sae, directions),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != CARD_NAME)
    card["sha256"] = {str(p.relative_to(out)): _sha256(p) for p in files}
    (out / CARD_NAME).write_text(json.dumps(card, indent=1, allow_nan=False) + "\n")
    return load_card(out)


def load_card(directory: str | Path) -> dict[str, Any]:
    """The ground-truth card of an organism directory.

    Raises:
        FlipscopeError: the directory holds no card (it is not an organism).
    """
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        raise FlipscopeError(
            f"{str(directory)!r} holds no organism ({CARD_NAME} missing); build one with `flipscope organism build`"
        )
    return json.loads(path.read_text())
