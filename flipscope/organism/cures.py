"""Cures for the organism's flips, each written as something any command loads: a checkpoint folder
(the weight edit) or a LoRA adapter folder (the fine-tunes). The clamp is the run-time edit the
audit builds itself (`ClampedVLM`).

- `fold`: the framing direction at a site (unit difference of means of x_para − x_orig over a
  FlipBank's flips, as rank-1 patching estimates it) removed from what the chosen layers' writers
  write (`flipscope.interventions.weight_edit.fold_writers`), saved with `cure.json`;
- `consistency`: a LoRA on the chosen layers only, trained so that every image-bearing paraphrase
  answers as the base model answers the original on the same film (`consistency_step`);
- `augment`: a LoRA on every layer trained on the augmented regime's data (every paraphrase
  equally often, true labels): the data lever.

Both fine-tunes never see the `withheld` families, so the audit measures them on phrasings they
were not trained on.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.organism.finetune import FinetuneConfig, finetune

__all__ = ["CURES", "cure_finetune_config", "make_cure"]

CURES = ("fold", "consistency", "augment")
CURE_FILE = "cure.json"


def cure_finetune_config(kind: str, layers: Sequence[int], withheld: Sequence[str]) -> FinetuneConfig:
    """The LoRA configuration of a fine-tune cure (`consistency` or `augment`)."""
    common = {"rank": 4, "alpha": 8.0, "withheld_families": tuple(withheld)}
    if kind == "consistency":
        return FinetuneConfig(
            name="consistency", objective="consistency", layers=tuple(layers), text_heavy=0.0, **common
        )
    if kind == "augment":
        return FinetuneConfig(name="augment", regime="augmented", text_heavy=0.25, **common)
    raise FlipscopeError(f"cure {kind!r} is not a fine-tune; expected consistency or augment")


def _fold(vlm: Any, bank_path: Path, hook: str, layers: Sequence[int], components: Sequence[str], out: Path):
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.rank1 import framing_direction
    from flipscope.interventions.weight_edit import fold_writers

    pairs = collect_pairs(vlm, load_flipbank(bank_path), [hook], progress=False)
    flips = pairs.delta(hook)[pairs.is_flip]
    direction = framing_direction(flips)
    cured = fold_writers(vlm, direction, layers, components, name=f"framing@{hook}")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    cured.hf_model.save_pretrained(staging, safe_serialization=True)
    cured.processor.save_pretrained(staging)
    record = {"cure": "fold", "hook": hook, "layers": list(layers), "components": list(components),
              "flipbank": str(bank_path), "n_flips": int(pairs.is_flip.sum()),
              "direction": [round(float(x), 6) for x in direction]}  # fmt: skip
    write_json(staging / CURE_FILE, record, allow_nan=False)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return record


def make_cure(
    kind: str,
    out: str | Path,
    organism: str | Path | None = None,
    *,
    flipbank: str | Path | None = None,
    hook: str = "blocks.0.hook_attn_out",
    layers: Sequence[int] = (0,),
    components: Sequence[str] = ("attn",),
    withheld: Sequence[str] = ("formal",),
) -> dict[str, Any]:
    """Make one cure (`CURES`) of `organism` into `out`; returns its record (`cure.json` for the
    fold, `finetune.json` for the fine-tunes). The fold needs `flipbank`, a FlipBank of the organism.

    Raises:
        FlipscopeError: an unknown kind, a fold without a FlipBank, or what the parts raise.
    """
    from flipscope.organism import OrganismConfig, load_organism

    if kind not in CURES:
        raise FlipscopeError(f"cure {kind!r} is unknown; expected one of {list(CURES)}")
    vlm, _, card = load_organism(organism)
    out = Path(out)
    if kind == "fold":
        if flipbank is None:
            raise FlipscopeError("the fold cure needs --flipbank: the flips its framing direction is estimated from")
        return _fold(vlm, Path(flipbank), hook, layers, components, out)
    cfg = OrganismConfig.from_dict(card["config"])
    return finetune(vlm, cfg, cure_finetune_config(kind, layers, withheld), out)
