"""Calibrating a guard and measuring it on held-out questions.

The questions are split once (seeded, by question) into a calibration part and a held-out part.
On the calibration part the guard's gates are fitted for a target recall:

- `margin` (one pass): flip-prone when |margin| ≤ t, t the smallest value that flags that share of
  the calibration part's flip-prone answers;
- `probe` (one pass): flip-prone when the probe's p ≥ τ, τ the largest value that flags that share
  on out-of-fold scores (k folds), the probe then refitted on the whole calibration part;
- `blank` (two passes): image-unreliant when removing the film moves the answer toward the other
  answer by ≤ s, fitted for recall of the opposite-label label.

On the held-out part: every detector × target AUROC with its bootstrap CI, each gate's realised
recall with its CI (the target should lie inside it) and the share it abstains on, and the
abstention curve — abstaining on the least confident answers first, the coverage against the
retained answers' accuracy, flip-prone and image-unreliant shares. Labels and detectors are in
`flipscope.experiments.detectors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flipscope.errors import FlipscopeError
from flipscope.experiments.detectors import (
    DETECTORS,
    TARGETS,
    crossfit_probe,
    detector_scores,
    fit_probe,
)
from flipscope.interventions.guarded import apply_probe
from flipscope.stats import auroc_ci, bootstrap

__all__ = ["COVERAGES", "abstention_curve", "guard_sentences", "guard_study", "threshold_for_recall"]

COVERAGES = tuple(round(c, 2) for c in np.linspace(0.1, 1.0, 19))
MIN_POSITIVES = 10  # fewer positives than this: the estimate says so


def threshold_for_recall(values: np.ndarray, labels: np.ndarray, recall: float) -> float | None:
    """The smallest t such that `values ≤ t` flags at least `recall` of the positives (`labels`
    1.0; NaN labels and values are left out; None when there is no positive)."""
    pos = np.sort(values[(labels == 1) & np.isfinite(values)])
    if not len(pos):
        return None
    return float(pos[max(0, math.ceil(recall * len(pos)) - 1)])


def abstention_curve(confidence: np.ndarray, arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Retaining the most confident answers (largest `confidence`) at each coverage: the retained
    answers' accuracy, flip-prone share and image-unreliant share (over those with a label)."""
    order = np.argsort(-confidence, kind="stable")
    curve = []
    for coverage in COVERAGES:
        kept = order[: max(1, round(coverage * len(order)))]
        point: dict[str, Any] = {"coverage": coverage, "n": len(kept)}
        for key in ("correct", *TARGETS):
            values = arrays[key][kept]
            values = values[np.isfinite(values)]
            point["accuracy" if key == "correct" else key] = float(values.mean()) if len(values) else None
        curve.append(point)
    return curve


def _recall(flagged: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    known = np.isfinite(labels)
    out = bootstrap(flagged[known & (labels == 1)].astype(np.float64), seed=seed).to_dict()
    out["flagged_share"] = float(flagged[known].mean())
    return out


def _fit_probes(
    part: Mapping[str, np.ndarray], features: np.ndarray | None, recall: float, seed: int
) -> tuple[dict[str, Any], float | None]:
    """Per target, a probe fitted on the calibration part; and the flip probe's threshold τ (p ≥ τ)
    for `recall`, read on out-of-fold scores."""
    probes: dict[str, Any] = {}
    threshold = None
    if features is None:
        return probes, threshold
    for target in TARGETS:
        known = np.isfinite(part[target])
        y = part[target][known] == 1
        if 0 < y.sum() < len(y):
            probes[target] = fit_probe(features[known], y)
            if target == "flip_prone":
                oof = crossfit_probe(features[known], y, seed=seed)
                below = threshold_for_recall(-oof, part[target][known], recall)  # p ≥ τ as −p ≤ −τ
                threshold = None if below is None else -below
    return probes, threshold


def _auroc_table(
    rest: Mapping[str, np.ndarray], probe_scores: Mapping[str, np.ndarray] | None, seed: int
) -> dict[str, dict[str, Any]]:
    """Detector → target → AUROC with its CI, over the questions with both a score and a label."""
    table: dict[str, dict[str, Any]] = {}
    for name, by_target in detector_scores(rest, probe_scores).items():
        for target, score in by_target.items():
            ok = np.isfinite(score) & np.isfinite(rest[target])
            if ok.any():
                found = auroc_ci(score[ok], rest[target][ok] == 1, seed) | {"n_unscored": int((~ok).sum())}
                table.setdefault(name, {})[target] = found
    return table


def guard_study(
    arrays: Mapping[str, np.ndarray],
    features: np.ndarray | None = None,
    *,
    recall: float = 0.9,
    calibration_share: float = 0.5,
    seed: int = 0,
    probe_hook: str | None = None,
) -> dict[str, Any]:
    """Calibrate on one part of the questions and measure on the rest (module docstring).

    Args:
        arrays: `flipscope.experiments.detectors.question_arrays` of one evaluation.
        features: Hidden states per question for the probe (`probe_features`), or None (no probe);
            `probe_hook` names where they were read (recorded for the guarded model).
        recall: The recall each gate is calibrated for.
    """
    if not 0 < recall < 1 or not 0 < calibration_share < 1:
        raise FlipscopeError(f"recall {recall} and calibration share {calibration_share} must lie in (0, 1)")
    n = len(arrays["id"])
    order = np.random.default_rng(seed).permutation(n)
    cal, held = np.sort(order[: round(calibration_share * n)]), np.sort(order[round(calibration_share * n) :])
    part = {k: v[cal] for k, v in arrays.items()}
    rest = {k: v[held] for k, v in arrays.items()}
    gates = {
        "margin": threshold_for_recall(np.abs(part["margin"]), part["flip_prone"], recall),
        "blank": threshold_for_recall(part["blank"], part["image_unreliant"], recall),
    }
    probes, gates["probe"] = _fit_probes(part, None if features is None else features[cal], recall, seed)
    probe_scores = None
    if features is not None:
        probe_scores = {t: apply_probe(probes[t], features[held]) if t in probes else np.full(len(held), np.nan)
                        for t in TARGETS}  # fmt: skip
    table = _auroc_table(rest, probe_scores, seed)
    realised = {}
    for gate, target, values in (
        ("margin", "flip_prone", np.abs(rest["margin"])),
        ("probe", "flip_prone", None if probe_scores is None else -probe_scores["flip_prone"]),
        ("blank", "image_unreliant", rest["blank"]),
    ):
        if gates.get(gate) is not None and values is not None:
            bound = -gates[gate] if gate == "probe" else gates[gate]
            realised[gate] = {"target": target, **_recall(values <= bound, rest[target], seed)}
    return {
        "recall_target": recall,
        "seed": seed,
        "n_calibration": len(cal),
        "n_held_out": len(held),
        "calibration_ids": arrays["id"][cal].tolist(),
        "thresholds": gates,
        "probes": {t: {k: np.asarray(v).tolist() for k, v in p.items()} for t, p in probes.items()},
        "probe_hook": probe_hook,
        "prevalence": {t: bootstrap(rest[t][np.isfinite(rest[t])], seed=seed).to_dict() for t in TARGETS},
        "no_opposite_film": int(np.isnan(arrays["image_unreliant"]).sum()),
        "auroc": table,
        "realised_recall": realised,
        "abstention": abstention_curve(np.abs(rest["margin"]), rest),
    }


_NAMES = {
    "margin": "|margin| (one pass)",
    "probe": "the hidden-state probe",
    "dispersion": "paraphrase dispersion",
    "blank": "the blank-image check",
    "swap": "the opposite-label swap",
}
_TARGET_NAMES = {"flip_prone": "flip-prone answers", "image_unreliant": "image-unreliant answers"}


def guard_sentences(study: Mapping[str, Any], name: str = "the model") -> list[str]:
    """What each detector catches and misses, chosen by its AUROC's CI against 0.5, and whether each
    gate's held-out recall holds its target; an estimate from fewer than 10 positives says so."""
    sentences = []
    for target in TARGETS:
        verdicts: dict[str, list[str]] = {"catches": [], "misses": [], "inverts": []}
        few = False
        for detector in DETECTORS:
            a = study["auroc"].get(detector, {}).get(target)
            if a is None or a["value"] is None:
                continue
            shown = f"{_NAMES[detector]} ({a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}])"
            key = "catches" if a["low"] > 0.5 else "inverts" if a["high"] < 0.5 else "misses"
            verdicts[key].append(shown)
            few = few or a["n_positive"] < MIN_POSITIVES
        parts = []
        if verdicts["catches"]:
            parts.append(f"caught above chance by {', '.join(verdicts['catches'])}")
        if verdicts["misses"]:
            parts.append(f"not told apart by {', '.join(verdicts['misses'])}")
        if verdicts["inverts"]:
            parts.append(f"ranked below chance by {', '.join(verdicts['inverts'])}")
        if parts:
            note = " (from fewer than 10 such answers)" if few else ""
            sentences.append(
                f"On {name}, {_TARGET_NAMES[target]} are " + "; ".join(parts) + f"{note} (AUROC, held out)."
            )
    for gate, r in study["realised_recall"].items():
        target = study["recall_target"]
        verb = "exceeds" if r["low"] > target else "falls short of" if r["high"] < target else "holds"
        note = " (from fewer than 10 such answers)" if r["n"] < MIN_POSITIVES else ""
        sentences.append(
            f"Gating on {_NAMES[gate]} for {_TARGET_NAMES[r['target']]}, calibrated for recall {target:.2f}, "
            f"{verb} it on held-out questions: {r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}]{note}, abstaining "
            f"on {r['flagged_share']:.0%} of them."
        )
    return sentences
