"""An SAE at the site a trace names, for any model flipscope loads, from the user's questions.

GemmaScope covers Gemma only; a LLaVA-Rad, CheXagent or Qwen user has no dictionary where the
framing enters. `train_site_sae` builds every wording of the questions under each evidence
condition exactly as an evaluation does (`unit_prompts`, swaps included), keeps a share of the
questions apart, caches the hook at every real token (`flipscope.sae.train.site_activations`),
trains and writes the SAE (`train_sae`, `save_trained_sae`), and measures it on the held-out
questions: fraction of variance unexplained, mean L0, dead share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flipscope.data.atomic import write_json
from flipscope.data.questions import Question
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import check_evidence, swap_images, unit_prompts
from flipscope.kernels import build_kernels
from flipscope.model.hook_points import check_activation_hook
from flipscope.sae.train import SAETrainConfig, sae_stats, save_trained_sae, site_activations, train_sae

__all__ = ["REPORT_NAME", "train_site_sae"]

REPORT_NAME = "training.json"


def _prompts(questions: Sequence[Question], conditions: Sequence[str]) -> list[Any]:
    """Every wording of every question under every condition, as the evaluation asks them."""
    text = conditions[0] == "context"
    swaps = swap_images(questions, 0, text=text) if "swap" in conditions else {}
    return [spec for condition in conditions for spec in unit_prompts(questions, condition, swaps)[0]]


def train_site_sae(
    vlm: Any,
    questions: Sequence[Question],
    hook: str,
    out: str | Path,
    cfg: SAETrainConfig | None = None,
    *,
    conditions: Sequence[str] = ("image", "blank"),
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an SAE at `hook` on `questions` (see the module docstring), write it to `out` with
    `training.json` beside it, and return that report: the config, the site, and FVU, L0 and dead
    share on the held-out questions' activations (and on the training ones).

    Raises:
        FlipscopeError: an unknown hook, a condition the model's family has no meaning for, missing
            evidence, or fewer than two questions.
    """
    cfg = cfg or SAETrainConfig()
    check_activation_hook(vlm, hook)
    check_evidence(questions, conditions, vlm)
    if len(questions) < 2:
        raise FlipscopeError("training an SAE needs at least two questions (some are held out to measure it)")
    order = np.random.default_rng(cfg.seed).permutation(len(questions))
    n_held = min(len(questions) - 1, max(1, round(cfg.held_out * len(questions))))
    held = [questions[i] for i in sorted(order[:n_held])]
    train = [questions[i] for i in sorted(order[n_held:])]
    acts = site_activations(vlm, _prompts(train, conditions), hook, batch_size=batch_size, progress=progress)
    held_acts = site_activations(vlm, _prompts(held, conditions), hook, batch_size=batch_size, progress=progress)
    trained = train_sae(acts, cfg, hook_name=hook, model_name=str(vlm.identity().get("name")))
    out = Path(out)
    sae = save_trained_sae(trained, out)
    report = {
        "hook": hook,
        "model": vlm.identity(),
        "config": cfg.to_dict(),
        "conditions": list(conditions),
        "questions": {"train": len(train), "held_out": len(held)},
        "held_out": sae_stats(sae, held_acts),
        "train": sae_stats(sae, acts),
        "kernels": build_kernels(f"SAE at {hook}", vlm.device),
    }
    write_json(out / REPORT_NAME, report)
    return report
