"""Organism sweeps: the same organism trained under each training-phrasing regime and seed, to find
which training distribution makes a model flip (the cause, varied one factor at a time).

Each run is one folder, `runs/<regime>-s<seed>/`, holding the trained checkpoint (an ordinary
folder `HookedVLM.from_pretrained` loads) and `run.json`, written last and atomically: a run with
its `run.json` is done and a rerun reuses it; a folder without one (a run that died) is trained
again. A `run.json` written under another config refuses to mix into the sweep.

A run's measures come from its own held-out films (the test stream), every template of every
family asked with the film and with the gray blank (`margin_table`): the flip rate is the share of
(item, paraphrase) pairs answered differently from the original question, over the paraphrases of
the trained families (`seen`) and of the withheld ones (`withheld`; never in any regime's
training). Under `canonical` the trained families' paraphrases are also never shown: only the
original is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.kernels import build_kernels
from flipscope.organism.behaviour import MarginTable, _share, margin_table
from flipscope.organism.config import REGIMES, OrganismConfig
from flipscope.organism.data import sample_films
from flipscope.organism.train import STREAM_TEST, deterministic, stream, train_model

__all__ = ["RUN_FILE", "run_dir", "run_measures", "run_sweep"]

RUN_FILE = "run.json"


def run_dir(out: str | Path, regime: str, seed: int) -> Path:
    """The folder of one run of a sweep written to `out`."""
    return Path(out) / "runs" / f"{regime}-s{seed}"


def run_measures(table: MarginTable, cfg: OrganismConfig) -> dict[str, Any]:
    """Flip rates on seen and withheld phrasings, accuracy and text-only agreement of one run
    (module docstring); a share with no pairs is None."""
    image = table.margins[:, :, 0] > 0
    blank = table.margins[:, :, 1] > 0
    pair_flips = image != image[:, :1]
    columns = np.arange(image.shape[1])
    withheld = np.isin(np.array(table.families), cfg.withheld_families)
    seen = ~withheld & (columns > 0)
    return {
        "n_items": int(len(table.truths)),
        "flip_rate_seen": _share(pair_flips[:, seen]),
        "flip_rate_withheld": _share(pair_flips[:, withheld]),
        "flip_rate_by_family": {
            fam.name: _share(
                pair_flips[:, table.family_columns(fam.name)[1:] if i == 0 else table.family_columns(fam.name)]
            )
            for i, fam in enumerate(cfg.families)
        },
        "accuracy": _share(image[:, 0] == table.truths),
        "text_only_agreement": _share(image[:, 0] == blank[:, 0]),
    }


def _train_run(cfg: OrganismConfig, folder: Path, progress: bool) -> dict[str, Any]:
    """Train one run, write its checkpoint into `folder` and measure it; returns its record."""
    start = time.perf_counter()
    vlm, log = train_model(cfg, progress=progress)
    shutil.rmtree(folder, ignore_errors=True)  # what a dead run left
    vlm.hf_model.save_pretrained(folder, safe_serialization=True)
    vlm.processor.save_pretrained(folder)
    seconds = time.perf_counter() - start
    with deterministic(cfg.threads):
        table = margin_table(vlm, cfg, sample_films(cfg, stream(cfg, STREAM_TEST), cfg.test_items))
    return {
        "regime": cfg.regime,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "train_seconds": round(seconds, 1),
        "kernels": build_kernels(f"organism sweep run {cfg.regime}/{cfg.seed}"),
        "final_accuracy": log.accuracy[-1] if log.accuracy else None,
        "measures": run_measures(table, cfg),
    }


def _done(folder: Path, cfg: OrganismConfig) -> dict[str, Any] | None:
    """The record of a finished run, None when it has not finished; refuses a run of another config."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("config") != json.loads(json.dumps(cfg.to_dict())):
        raise FlipscopeError(
            f"{path} was written under another organism config; sweep into a new folder, or delete {folder}"
        )
    return record


def run_sweep(
    base: OrganismConfig,
    regimes: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and measure `base` under every regime × seed (resumable, one folder per run; module
    docstring) and return the runs' records, regime-major.

    Raises:
        FlipscopeError: an unknown or repeated regime, no seeds, or a finished run of another config.
    """
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not regimes or len(set(regimes)) != len(regimes):
        raise FlipscopeError(f"regimes {list(regimes)}: expected distinct names from {list(REGIMES)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FlipscopeError(f"seeds {list(seeds)}: expected one or more distinct seeds")
    plan = [dataclasses.replace(base, regime=r, seed=int(s)) for r in regimes for s in seeds]
    records = []
    for cfg in tqdm(plan, desc="organism sweep", disable=not progress):
        folder = run_dir(out, cfg.regime, cfg.seed)
        record = _done(folder, cfg)
        if record is None:
            record = _train_run(cfg, folder, progress=False)
            write_json(folder / RUN_FILE, record, allow_nan=False)
        records.append(record)
    return records
