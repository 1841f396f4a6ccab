"""What a regimes × seeds sweep found: per regime the seed spread of each measure, every pair of
regimes compared on the flip rates (Mann–Whitney over seeds, Cliff's δ, Benjamini–Hochberg q over
the family of comparisons), and within a regime seen against withheld phrasings (Wilcoxon over
seeds). `flipscope.reporting.sweep_report` words the findings."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from flipscope.stats import bh_qvalues, cliffs_delta

__all__ = ["ALPHA", "FLIP_MEASURES", "MEASURES", "summarize_sweep"]

MEASURES = ("flip_rate_seen", "flip_rate_withheld", "accuracy", "text_only_agreement")
FLIP_MEASURES = ("flip_rate_seen", "flip_rate_withheld")
ALPHA = 0.05


def _spread(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {
        "values": [round(float(x), 6) for x in v],
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _by_regime(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["regime"], []).append(r)
    return groups


def _values(runs: Sequence[Mapping[str, Any]], measure: str) -> list[float] | None:
    values = [r["measures"][measure] for r in runs]
    return None if any(v is None for v in values) else values


def _paired(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    seen, withheld = _values(runs, "flip_rate_seen"), _values(runs, "flip_rate_withheld")
    if seen is None or withheld is None:
        return None
    diff = np.asarray(withheld) - np.asarray(seen)
    p = 1.0 if not diff.any() else float(stats.wilcoxon(diff).pvalue)
    return {"n": len(diff), "withheld_higher": int((diff > 0).sum()), "seen_higher": int((diff < 0).sum()), "p": p}


def summarize_sweep(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per regime the spread of every measure over seeds (None where a measure has no pairs),
    every pair of regimes compared on each flip rate, and seen against withheld per regime."""
    groups = _by_regime(records)
    regimes = {
        name: {
            "n_seeds": len(runs),
            "seeds": [r["seed"] for r in runs],
            **{m: (None if (v := _values(runs, m)) is None else _spread(v)) for m in MEASURES},
            "seen_vs_withheld": _paired(runs),
        }
        for name, runs in groups.items()
    }
    comparisons = []
    for measure in FLIP_MEASURES:
        for a, b in itertools.combinations(groups, 2):
            va, vb = _values(groups[a], measure), _values(groups[b], measure)
            if va is None or vb is None:
                continue
            test = cliffs_delta(np.asarray(va), np.asarray(vb))
            comparisons.append({"measure": measure, "a": a, "b": b, "mean_a": float(np.mean(va)),
                                "mean_b": float(np.mean(vb)), **test})  # fmt: skip
    if comparisons:
        for c, q in zip(comparisons, bh_qvalues(np.array([c["p"] for c in comparisons])), strict=True):
            c["q"] = float(q)
    return {"regimes": regimes, "comparisons": comparisons, "alpha": ALPHA}
