"""Cures for the organism's flips, each written as something any command loads: a checkpoint folder
(the weight edit) or a LoRA adapter folder (the fine-tunes). The clamp is the run-time edit the
audit builds itself (`ClampedVLM`).

- `fold`: a direction removed from what the chosen layers' writers write
  (`flipscope.interventions.weight_edit.fold_writers`), saved with `cure.json`: by default the
  framing direction at a site (unit difference of means of x_para − x_orig over a FlipBank's
  flips, as rank-1 patching estimates it); or the DiffMean direction (flips minus controls),
  SAE features' decoder rows, or vectors from a file;
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


def _direction(vlm: Any, sae: Any, source: str, bank_path: Path | None, hook: str) -> tuple[Any, dict[str, Any]]:
    """The direction(s) a fold removes, and what they are: `framing` or `diffmean` from the FlipBank's
    pairs at `hook`, `features:F1,F2` (the SAE's decoder rows), or a `.npy` file (a vector or a stack)."""
    import numpy as np
    import torch

    if source.startswith("features:"):
        try:
            features = [int(f) for f in source.removeprefix("features:").split(",") if f.strip()]
        except ValueError as err:
            raise FlipscopeError(f"--direction {source!r}: expected features:F1,F2 (integers)") from err
        if not features or max(features) >= sae.W_dec.shape[0] or min(features) < 0:
            raise FlipscopeError(f"--direction {source!r}: features must lie in 0..{sae.W_dec.shape[0] - 1}")
        return sae.W_dec.detach()[features].float(), {"direction": source, "features": features}
    if source not in ("framing", "diffmean"):
        path = Path(source)
        if path.suffix != ".npy" or not path.is_file():
            raise FlipscopeError(f"--direction {source!r}: expected framing, diffmean, features:F1,F2 or a .npy file")
        return torch.from_numpy(np.load(path)).float(), {"direction": str(path)}
    if bank_path is None:
        raise FlipscopeError(f"--direction {source}: needs --flipbank, the flips it is estimated from")
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.directions import diffmean_direction
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.rank1 import framing_direction

    pairs = collect_pairs(vlm, load_flipbank(bank_path), [hook], progress=False)
    vector = (
        framing_direction(pairs.delta(hook)[pairs.is_flip]) if source == "framing" else diffmean_direction(pairs, hook)
    )
    return vector, {"direction": source, "hook": hook, "flipbank": str(bank_path), "n_flips": int(pairs.is_flip.sum())}


def _fold(vlm: Any, direction: Any, about: dict[str, Any], layers: Sequence[int], components: Sequence[str], out: Path):
    from flipscope.interventions.weight_edit import fold_writers

    cured = fold_writers(vlm, direction, layers, components, name=about["direction"])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    cured.hf_model.save_pretrained(staging, safe_serialization=True)
    cured.processor.save_pretrained(staging)
    rows = direction.reshape(-1, direction.shape[-1])
    record = {"cure": "fold", **about, "layers": list(layers), "components": list(components),
              "vectors": [[round(float(x), 6) for x in row] for row in rows]}  # fmt: skip
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
    direction: str = "framing",
    hook: str = "blocks.0.hook_attn_out",
    layers: Sequence[int] = (0,),
    components: Sequence[str] = ("attn",),
    withheld: Sequence[str] = ("formal",),
) -> dict[str, Any]:
    """Make one cure (`CURES`) of `organism` into `out`; returns its record (`cure.json` for the
    fold, `finetune.json` for the fine-tunes). The fold removes `direction` (`_direction`: the
    `framing` and `diffmean` directions need `flipbank`, a FlipBank of the organism).

    Raises:
        FlipscopeError: an unknown kind, a fold without a FlipBank, or what the parts raise.
    """
    from flipscope.organism import OrganismConfig, load_organism

    if kind not in CURES:
        raise FlipscopeError(f"cure {kind!r} is unknown; expected one of {list(CURES)}")
    vlm, sae, card = load_organism(organism)
    out = Path(out)
    if kind == "fold":
        vectors, about = _direction(vlm, sae, direction, None if flipbank is None else Path(flipbank), hook)
        return _fold(vlm, vectors, about, layers, components, out)
    cfg = OrganismConfig.from_dict(card["config"])
    return finetune(vlm, cfg, cure_finetune_config(kind, layers, withheld), out)
