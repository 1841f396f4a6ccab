"""The model organism: a small Gemma 3 VLM trained here on synthetic chest films with a planted
text shortcut, its SAE, and a ground-truth card saying what every stage should find.

The default organism ships in `flipscope/organism/default/` (see `default_organism_dir`); it is
rebuilt bit for bit by `flipscope organism build`.
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
]


def default_organism_dir() -> Path:
    """Where the shipped default organism lives."""
    return Path(__file__).parent / "default"


def load_organism(directory: str | Path | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The organism's `HookedVLM`, its sae-lens SAE and its card, loaded through the user path
    (`HookedVLM.from_pretrained(dir)`, `sae_lens.SAE.load_from_disk(dir/sae)`).

    Raises:
        FlipscopeError: the directory is not an organism (no card).
    """
    from sae_lens import SAE

    from flipscope.model.hooked import HookedVLM

    directory = Path(directory) if directory is not None else default_organism_dir()
    card = load_card(directory)
    vlm = HookedVLM.from_pretrained(directory)
    sae = SAE.load_from_disk(str(directory / SAE_DIR), device=str(vlm.device))
    return vlm, sae, card
