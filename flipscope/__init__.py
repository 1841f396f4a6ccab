"""flipscope: why a medical VLM flips its yes/no answer under paraphrase, and which feature does it.

The package follows the data flow, each layer importing only the layers before it:

    errors, stats  →  data  →  model  →  sae  →  interventions  →  experiments  →  organism
                   →  reporting  →  cli

- `data`: questions, PSF-Med and answer tables, the resumable result store, FlipBanks (files in,
  validated objects out);
- `model`: `HookedVLM` (hook points on the HF model), prompts, images, answers, KV-cache paths;
- `sae`: SAEs through sae-lens, checked against a model, and their encodings;
- `interventions`: pure hook functions and edited sibling models (`ClampedVLM`);
- `experiments`: evaluation, summaries, pair activations, discovery, patching, clamping;
- `organism`: the shipped model organism with a planted shortcut;
- `reporting`: figures, the report page and the demo pipeline; `cli`: the `flipscope` command.

The names below are the ones a notebook needs; they load on first use, so `import flipscope`
costs no torch. Everything else is imported from its module.

Tensor shapes in signatures use one vocabulary of dimension names:

- `batch`: prompts in a batch; `pos`: token positions (left-padded, last prompt token at -1);
- `d_model`: language-model residual width; `d_vocab`: vocabulary size;
- `d_sae`: SAE features; `n_images`: images in a batch; `n_patches`: vision patches;
- `n_image_tokens`: image soft tokens per image; `d_vision`: vision width;
- `channel`, `height`, `width`: image tensor axes; `case`: FlipBank cases.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flipscope._moved import MOVED, OLD_NAMES, install_moved_modules, warn_moved

__all__ = [
    "ClampedVLM",
    "DirectionAblatedVLM",
    "FlipscopeError",
    "HookedVLM",
    "PromptSpec",
    "compare_interventions",
    "diffmean_direction",
    "discover",
    "feature_dashboard",
    "load_discovery",
    "load_flipbank",
    "load_organism",
    "load_questions",
    "load_sae",
    "patch_bank",
    "run_demo",
    "run_sweep",
    "summarize",
]

_WHERE = {
    "ClampedVLM": "flipscope.interventions",
    "DirectionAblatedVLM": "flipscope.interventions",
    "FlipscopeError": "flipscope.errors",
    "HookedVLM": "flipscope.model",
    "PromptSpec": "flipscope.model",
    "compare_interventions": "flipscope.experiments.clamping",
    "diffmean_direction": "flipscope.experiments.directions",
    "discover": "flipscope.experiments.discovery",
    "feature_dashboard": "flipscope.experiments.dashboard",
    "load_discovery": "flipscope.experiments.discovery",
    "load_flipbank": "flipscope.data.flipbank",
    "load_organism": "flipscope.organism",
    "load_questions": "flipscope.data.questions",
    "load_sae": "flipscope.sae",
    "patch_bank": "flipscope.experiments.patching",
    "run_demo": "flipscope.reporting.demo",
    "run_sweep": "flipscope.experiments.evaluation",
    "summarize": "flipscope.experiments.summary",
}

install_moved_modules()


def __getattr__(name: str) -> Any:
    """Load an exported name on first use (PEP 562); an old top-level name warns and still works."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif f"flipscope.{name}" in MOVED:
        return importlib.import_module(f"flipscope.{name}")
    elif name in OLD_NAMES:
        warn_moved(f"flipscope.{name}", f"{OLD_NAMES[name]}.{name}")
        value = getattr(importlib.import_module(OLD_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'flipscope' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from flipscope.data.flipbank import load_flipbank
    from flipscope.data.questions import load_questions
    from flipscope.errors import FlipscopeError
    from flipscope.experiments.clamping import compare_interventions
    from flipscope.experiments.directions import diffmean_direction
    from flipscope.experiments.discovery import discover, load_discovery
    from flipscope.experiments.evaluation import run_sweep
    from flipscope.experiments.patching import patch_bank
    from flipscope.experiments.summary import summarize
    from flipscope.interventions import ClampedVLM, DirectionAblatedVLM
    from flipscope.model import HookedVLM, PromptSpec
    from flipscope.organism import load_organism
    from flipscope.reporting.demo import run_demo
    from flipscope.sae import load_sae
