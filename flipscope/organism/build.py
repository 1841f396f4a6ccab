"""Building an organism end to end and writing it where `HookedVLM.from_pretrained` reads it.

Layout of an organism directory::

    config.json, model.safetensors, tokenizer.json, ...   the HF checkpoint and processor
    sae/cfg.json, sae/sae_weights.safetensors             the JumpReLU SAE (sae-lens format)
    ground_truth.json                                     the card: config, planted shortcut,
                                                          directions, aligned SAE features,
                                                          measured behaviour, file sha256s
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import JumpReLUSAE
from torch import Tensor

from flipscope.data.atomic import file_sha256, write_json
from flipscope.errors import FlipscopeError
from flipscope.kernels import build_kernels
from flipscope.model.answers import yes_no_margin
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism.behaviour import margin_table, summarize
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Film, question, sample_films
from flipscope.organism.sae_train import (
    collect_activations,
    generated_text_activations,
    sae_stats,
    save_sae,
    train_sae,
)
from flipscope.organism.train import STREAM_SAE, STREAM_TEST, deterministic, stream, train_model

__all__ = [
    "CARD_NAME",
    "SAE_DIR",
    "aligned_features",
    "build_organism",
    "framing_directions",
    "load_card",
    "split_half_null",
]

CARD_NAME = "ground_truth.json"
SAE_DIR = "sae"


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def _resid_and_margin(vlm: HookedVLM, hook: str, specs: list[PromptSpec], batch_size: int = 256):
    """Residual at `hook` (last prompt position) and margin of every prompt."""
    resid, margin = [], []
    for i in range(0, len(specs), batch_size):
        batch = vlm.prompts.build(specs[i : i + batch_size])
        logits, cache = vlm.run_with_cache(batch, names_filter=hook, positions="last", logits_to_keep=1)
        resid.append(cache[hook].float())
        margin.append(yes_no_margin(logits[:, -1], vlm.answer_tokens))
    return torch.cat(resid), torch.cat(margin)


def _family_runs(vlm: HookedVLM, cfg: OrganismConfig, films: list[Film], family: str):
    """[item, template, d_model] residuals and [item, template] margins of one family, with the image."""
    fam = cfg.question_family(family)
    specs = [
        PromptSpec(question=question(cfg, family, t, f.name), image=film.pixels)
        for film in films
        for f in cfg.findings
        for t in range(len(fam.templates))
    ]
    resid, margin = _resid_and_margin(vlm, cfg.sae_hook, specs)
    n_items = len(films) * len(cfg.findings)
    return resid.view(n_items, len(fam.templates), -1), margin.view(n_items, len(fam.templates))


def split_half_null(x: Float[Tensor, "item template d_model"]) -> Float[Tensor, " split"]:
    """Norms of the mean difference between two halves of one family's templates, over every
    split: how far apart wordings that carry no framing lie at this layer."""
    n = x.shape[1]
    if n < 2:
        raise FlipscopeError("a split-half null needs a first family of at least 2 templates")
    splits = [a for k in range(1, n // 2 + 1) for a in itertools.combinations(range(n), k)]
    norms = []
    for half in splits:
        other = [t for t in range(n) if t not in half]
        norms.append(float((x[:, list(half)].mean(1) - x[:, other].mean(1)).mean(0).norm()))
    return torch.tensor(norms)


@torch.no_grad()
def framing_directions(
    vlm: HookedVLM, cfg: OrganismConfig, films: list[Film], sae: JumpReLUSAE | None = None
) -> dict[str, Any]:
    """The ground-truth framing direction at the SAE layer, its null, and its overlap with the answer.

    `framing` is the mean, over held-out items (film × finding) that no wording of the first or
    the shortcut family flips, of the shortcut family's mean residual minus the first family's
    (last prompt position, with the image): the wording's own effect, measured where the answer
    did not change, so the answer readout is not mixed in. `null_norms` holds the same
    difference between two halves of the first family's templates, over every split, and
    `significant` says whether the framing's norm exceeds them all. `answer` is the difference
    of means between first-family prompts answered yes and no (None when the model gives one
    answer only); `framing_orth` is `framing` without its component along `answer`. With `sae`,
    `feature_shift` is the difference of means of every feature's activation over the same items.
    """
    neutral, shortcut = cfg.families[0].name, cfg.shortcut_family
    x_neutral, m_neutral = _family_runs(vlm, cfg, films, neutral)
    x_shortcut, m_shortcut = _family_runs(vlm, cfg, films, shortcut)
    answer_of = m_neutral[:, :1] > 0
    held = ((m_neutral > 0) == answer_of).all(1) & ((m_shortcut > 0) == answer_of).all(1)
    if not held.any():
        raise FlipscopeError("every held-out item flips; the framing cannot be measured apart from the answer")
    framing = x_shortcut[held].mean((0, 1)) - x_neutral[held].mean((0, 1))
    null = split_half_null(x_neutral[held])
    shift = None
    if sae is not None:
        shift = sae.encode(x_shortcut[held].flatten(0, 1)).mean(0) - sae.encode(x_neutral[held].flatten(0, 1)).mean(0)
    said_yes = (m_neutral > 0).flatten()
    out = {
        "framing": framing,
        "null_norms": null,
        "significant": bool(float(framing.norm()) > float(null.max())),
        "n_items": int(held.sum()),
        "feature_shift": shift,
        "answer": None,
        "framing_orth": framing,
        "cosine_framing_answer": None,
    }
    if said_yes.all() or not said_yes.any():  # the model gives one answer only: no answer direction
        return out
    flat = x_neutral.flatten(0, 1)
    answer = flat[said_yes].mean(0) - flat[~said_yes].mean(0)
    out["answer"] = answer
    out["framing_orth"] = framing - (framing @ _unit(answer)) * _unit(answer)
    out["cosine_framing_answer"] = float(_unit(framing) @ _unit(answer))
    return out


ALIGNED_SHARE = 0.1


def aligned_features(sae: JumpReLUSAE, directions: dict[str, Any], top: int = 5) -> list[dict[str, Any]]:
    """The SAE features that carry the planted framing, most first.

    A feature's `share` is how much of the framing direction its own change supplies: its mean
    activation shift between shortcut-family and first-family prompts (`feature_shift`) times
    its decoder row, projected on the unit framing direction, over the direction's length. A
    feature that switches on under the shortcut framing and one that switches off under it (a
    "neutral question" feature) both count; a decoder row that merely points along the framing
    while the feature stays silent does not. `aligned` marks share ≥ `ALIGNED_SHARE`, and only
    when the framing direction itself beats its split-half null (`significant`): a wording with
    no planted effect has no feature that carries it. `cosine` is the decoder row's cosine with
    the framing direction (and `cosine_orth` with its part orthogonal to the answer direction).
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
            "aligned": bool(directions["significant"] and float(share[i]) >= ALIGNED_SHARE),
        }
        for i in order
    ]


def _vector(v: Float[Tensor, " d_model"]) -> list[float]:
    return [round(float(x), 6) for x in v]


TRAINING_FILE = "training.json"
# Fields that only the SAE and the card read: changing them keeps a real-base organism's deltas.
_AFTER_TRAINING = ("sae_layer", "d_sae", "sae_prompts", "sae_steps", "sae_batch", "sae_lr", "sae_target_l0",
                   "sae_init_threshold", "test_items")  # fmt: skip


def _training_block(cfg: OrganismConfig, log: Any) -> dict[str, Any]:
    return {
        # a real base's stage 1 aligns soft tokens to words: its score is their cosine
        ("vision_accuracy" if cfg.base is None else "vision_word_cosine"): log.vision_accuracy,
        "final_loss": log.loss[-1] if log.loss else None,
        "final_accuracy": log.accuracy[-1] if log.accuracy else None,
    }


def _train_and_save(cfg: OrganismConfig, out: Path, progress: bool) -> tuple[HookedVLM, dict[str, Any]]:
    """Train the model and write it to `out`: the whole checkpoint, or for a real base only the
    deltas with `training.json` (the training config and result), then reassemble the model from
    them as `load_organism` will. A real-base build whose `out` already holds deltas trained with
    the same training config resumes from them (the SAE and the card are redone)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.base is None:
        vlm, log = train_model(cfg, progress=progress)
        vlm.hf_model.save_pretrained(out, safe_serialization=True)
        vlm.processor.save_pretrained(out)
        return vlm, _training_block(cfg, log)
    from flipscope.organism.deltas import assemble, delta_files, save_deltas
    from flipscope.organism.real import train_real

    training = {k: v for k, v in cfg.to_dict().items() if k not in _AFTER_TRAINING}
    marker = out / TRAINING_FILE
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("config") != json.loads(json.dumps(training)):
        start = time.perf_counter()
        model, _, log = train_real(cfg, progress=progress)
        save_deltas(model, out)
        done = {"config": training, "training": _training_block(cfg, log)}
        done["training"]["seconds"] = round(time.perf_counter() - start, 1)
        write_json(marker, done, allow_nan=False)
    sha256 = {name: file_sha256(out / name) for name in delta_files(out)}
    return HookedVLM.from_pretrained(assemble(out, cfg, sha256)), done["training"]


def _sae_data(vlm: HookedVLM, cfg: OrganismConfig) -> tuple[Tensor, Tensor]:
    """Training and held-out activations: the organism's prompts, and for a real base also the
    text it writes itself (BOS dropped)."""
    real = cfg.base is not None
    sae_rng = stream(cfg, STREAM_SAE)
    acts = collect_activations(vlm, cfg, sae_rng, cfg.sae_prompts, drop_first=real)
    held_out = collect_activations(vlm, cfg, sae_rng, max(cfg.sae_prompts // 5, 64), drop_first=real)
    if real:
        text = generated_text_activations(vlm, cfg, n_texts=REAL_TEXTS, n_tokens=REAL_TEXT_TOKENS)
        cut = len(text) * 4 // 5
        acts, held_out = torch.cat([acts, text[:cut]]), torch.cat([held_out, text[cut:]])
    return acts, held_out


# Text a real base writes for its SAE: sequences × tokens (about a sixth of the prompts' tokens;
# sampling costs ~0.5 s a token for the batch on two cores).
REAL_TEXTS, REAL_TEXT_TOKENS = 32, 96


def _directions_block(directions: dict[str, Any]) -> dict[str, Any]:
    return {
        "cosine_framing_answer": directions["cosine_framing_answer"],
        "framing_norm": float(directions["framing"].norm()),
        "framing_null_norms": [round(float(v), 6) for v in directions["null_norms"]],
        "framing_significant": directions["significant"],
        "framing_items": directions["n_items"],
        "framing": _vector(directions["framing"]),
        "framing_orth": _vector(directions["framing_orth"]),
        "answer": None if directions["answer"] is None else _vector(directions["answer"]),
    }


def build_organism(cfg: OrganismConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train the model and its SAE, measure them on held-out films, and write everything to `out`.

    Returns the card as written (`load_card(out)`).
    """
    out = Path(out)
    start = time.perf_counter()
    vlm, training = _train_and_save(cfg, out, progress)
    with deterministic(cfg.threads):
        acts, held_out = _sae_data(vlm, cfg)
        trained_sae = train_sae(acts, cfg)
    sae = save_sae(trained_sae, out / SAE_DIR, half=cfg.base is not None)
    build_seconds = time.perf_counter() - start

    with deterministic(cfg.threads):
        test_films = sample_films(cfg, stream(cfg, STREAM_TEST), cfg.test_items)
        table = margin_table(vlm, cfg, test_films)
        directions = framing_directions(vlm, cfg, test_films, sae) if cfg.base is None else None
    card: dict[str, Any] = {
        "format": "flipscope-organism/1",
        "config": cfg.to_dict(),
        "shortcut": {"family": cfg.shortcut_family, "target": cfg.shortcut_target, "p": cfg.planted_p},
        "hook_name": cfg.sae_hook,
        "build": {
            "seconds": round(build_seconds, 1),
            "threads": cfg.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "kernels": build_kernels(f"organism {out}"),
        },
        "training": training,
        "behaviour": summarize(table, cfg),
        "sae": sae_stats(sae, held_out),
        "directions": None if directions is None else _directions_block(directions),
        "framing_features": [] if directions is None else aligned_features(sae, directions),
    }
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != CARD_NAME)
    card["sha256"] = {str(p.relative_to(out)): file_sha256(p) for p in files}
    write_json(out / CARD_NAME, card, allow_nan=False)
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
