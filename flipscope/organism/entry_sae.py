"""A second SAE for an organism, at the site where the framing enters.

On the shipped organism the framing reaches the answer position in layer 0's attention and has
become the answer readout by the layer of its first SAE (`blocks.2.hook_resid_post`), whose
framing-specific features then recover only a fifth of the margin. `train_entry_sae` trains a
dictionary by the organism's own recipe (the same prompts, steps, L0 target and seed) at the hook a
trace names, stores it in float16 under `sae_entry/`, and records its hook, size, FVU, L0 and dead
share on the recipe's held-out prompts in the card (`entry_sae`), with the files' sha256s.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from flipscope.data.atomic import file_sha256, write_json
from flipscope.errors import FlipscopeError
from flipscope.kernels import build_kernels

__all__ = ["ENTRY_DIR", "load_entry_sae", "train_entry_sae"]

ENTRY_DIR = "sae_entry"


def train_entry_sae(organism: str | Path | None, hook: str, *, d_sae: int | None = None) -> dict[str, Any]:
    """Train the organism's entry-site SAE at `hook` (see the module docstring) and return its card
    entry. `d_sae` defaults to the first SAE's size.

    Raises:
        FlipscopeError: `hook` is not a hook point of the organism.
    """
    from flipscope.organism import load_organism, organism_dir
    from flipscope.organism.build import CARD_NAME
    from flipscope.organism.config import OrganismConfig
    from flipscope.organism.sae_train import collect_activations, sae_stats, save_sae, train_sae
    from flipscope.organism.train import STREAM_SAE, deterministic, stream

    directory = organism_dir(organism)
    vlm, _, card = load_organism(directory)
    vlm.check_hook_name(hook)
    cfg = OrganismConfig.from_dict(card["config"])
    sized = replace(cfg, d_sae=d_sae) if d_sae else cfg
    real = cfg.base is not None
    with deterministic(cfg.threads):
        rng = stream(cfg, STREAM_SAE)
        acts = collect_activations(vlm, cfg, rng, cfg.sae_prompts, drop_first=real, hook=hook)
        held_out = collect_activations(vlm, cfg, rng, max(cfg.sae_prompts // 5, 64), drop_first=real, hook=hook)
        trained = train_sae(acts, sized, hook=hook)
    sae = save_sae(trained, directory / ENTRY_DIR, half=True)
    kernels = build_kernels(f"entry SAE {hook}")
    entry = {"hook": hook, "d_sae": sized.d_sae, **sae_stats(sae, held_out), "kernels": kernels}
    files = sorted(p for p in (directory / ENTRY_DIR).iterdir() if p.is_file())
    card["entry_sae"] = entry
    kept = {k: v for k, v in card["sha256"].items() if not k.startswith(f"{ENTRY_DIR}/")}
    added = {f"{ENTRY_DIR}/{p.name}": file_sha256(p) for p in files}
    card["sha256"] = dict(sorted((kept | added).items()))
    write_json(directory / CARD_NAME, card, allow_nan=False)
    return entry


def load_entry_sae(organism: str | Path | None = None, device: str = "cpu") -> Any:
    """The organism's entry-site SAE (a sae-lens `JumpReLUSAE` reading `card["entry_sae"]["hook"]`).

    Raises:
        FlipscopeError: the organism has none (train it with `flipscope organism entry-sae`).
    """
    from flipscope.organism import organism_dir
    from flipscope.organism.build import load_card
    from flipscope.sae.load import load_sae

    directory = organism_dir(organism)
    if "entry_sae" not in load_card(directory):
        raise FlipscopeError(
            f"the organism in {str(directory)!r} has no entry-site SAE; train one with `flipscope organism entry-sae`"
        )
    return load_sae(directory / ENTRY_DIR, device=device)
