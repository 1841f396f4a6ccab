"""Comparing evaluation runs: the false-reliability trap across models, adapters, sites and edits.

Per run (one evaluation store, from `flipscope evaluate` or `flipscope import-answers`: a model
nobody can hook compares beside hooked ones): flip rate, pairwise disagreement, accuracy, yes-rate
(the share of originals answered yes: the answer bias), per-family paraphrase flip rates, text-only
agreement and the four quadrants' shares, each quadrant's accuracy and entropy — bootstrap 95% CIs
over questions — and **screening**: how well a confidence screen, which flags the least confident
answers (by the original's |margin|; yes/no entropy and p(answer) are monotone in it, so they rank
questions identically), picks out the Dangerous questions (AUROC of uncertainty, its ROC curve, and
the Dangerous share among the most confident k%), beside the one extra text-only forward (flag a
question when its answer survives the image's removal: it flags every Dangerous question by
definition, and its specificity is what that costs).

Across runs: Pearson and Spearman correlation of flip rate with the Dangerous share, with CIs from a
bootstrap over runs and one over questions within each run (runs without an image-removed condition
have no quadrants and sit out); between runs that share questions, exact McNemar tests on flipping,
on correctness and on Dangerous membership.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool, Float
from scipy import stats as sps

from flipscope.data.store import iter_rows, read_header
from flipscope.errors import FlipscopeError
from flipscope.experiments.summary import by_family, quadrant_blocks, question_block, question_table
from flipscope.stats import auroc_ci, bootstrap

__all__ = ["QUESTION_MODES", "Comparison", "compare_runs", "mcnemar", "run_table", "screening"]

QUESTION_MODES = ("same", "shared", "own")
TOP_SHARES = (0.1, 0.25, 0.5)


def mcnemar(a: Bool[np.ndarray, " n"], b: Bool[np.ndarray, " n"]) -> dict[str, Any]:
    """Exact McNemar test of paired binary outcomes: discordant counts and the two-sided binomial p."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"n": len(a), "only_first": only_a, "only_second": only_b, "p": p}


def _roc(scores: np.ndarray, labels: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """The ROC curve of `scores` for `labels` (higher score = flagged first), at most `points` points."""
    order = np.argsort(-scores, kind="stable")
    tp = np.concatenate([[0], np.cumsum(labels[order])]) / max(labels.sum(), 1)
    fp = np.concatenate([[0], np.cumsum(~labels[order])]) / max((~labels).sum(), 1)
    keep = np.unique(np.linspace(0, len(tp) - 1, min(points, len(tp))).round().astype(int))
    return {"fpr": fp[keep].round(4).tolist(), "tpr": tp[keep].round(4).tolist()}


def screening(
    confidence: Float[np.ndarray, " n"],
    text_only: Bool[np.ndarray, " n"],
    dangerous: Bool[np.ndarray, " n"],
    seed: int = 0,
) -> dict[str, Any]:
    """How a confidence screen (flag the least confident answers) and the text-only check (flag an
    answer that survives the image's removal) detect the Dangerous questions (module docstring)."""
    dangerous, flagged = dangerous.astype(bool), text_only.astype(bool)
    order = np.argsort(-confidence, kind="stable")
    top = {
        f"{share:g}": bootstrap(dangerous[order[: max(1, round(share * len(order)))]], seed=seed).to_dict()
        for share in TOP_SHARES
    }
    return {
        "n": len(dangerous),
        "dangerous_share": bootstrap(dangerous, seed=seed).to_dict(),
        "uncertainty_auroc": auroc_ci(-confidence, dangerous, seed),
        "uncertainty_roc": _roc(-confidence, dangerous),
        "dangerous_among_most_confident": top,
        "text_only_sensitivity": bootstrap(flagged[dangerous], seed=seed).to_dict(),
        "text_only_specificity": bootstrap(~flagged[~dangerous], seed=seed).to_dict(),
        "text_only_auroc": auroc_ci(flagged.astype(np.float64), dangerous, seed),
    }


def run_table(entries: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The per-run table of `question_table` entries (module docstring): the evaluation summary's
    overall and per-quadrant blocks, and the screening."""
    entries = list(entries)
    table: dict[str, Any] = {
        **question_block(entries, seed),
        "yes_rate": bootstrap(np.array([e["yes"] for e in entries], dtype=np.float64), seed=seed).to_dict(),
        "by_strategy": _by_strategy(entries, seed),
        "quadrants": quadrant_blocks(entries, seed),
        "quadrants_available": any(e["quadrant"] is not None for e in entries),
    }
    judged = [e for e in entries if e["quadrant"] is not None]
    if judged and all(e["margin"] is not None for e in judged):
        table["screening"] = screening(
            np.abs(np.array([e["margin"] for e in judged], dtype=np.float64)),
            np.array([not e["reliant"] for e in judged]),
            np.array([e["quadrant"] == "Dangerous" for e in judged]),
            seed,
        )
    return table


def _by_strategy(entries: Sequence[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Per paraphrase family: the share of its paraphrases whose answer flips, CI over paraphrases."""
    groups = by_family(entries, "paraphrase_flips")
    return {s: bootstrap(np.array(v, dtype=np.float64), seed=seed).to_dict() for s, v in sorted(groups.items())}


@dataclass
class Comparison:
    """Per-run tables, the cross-run correlation and the paired tests (`to_dict` for JSON)."""

    names: list[str]
    paths: list[str]
    questions: str
    n_shared: int
    runs: dict[str, dict[str, Any]]
    correlation: dict[str, Any]
    paired: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "flipscope-compare/1",
            "names": self.names,
            "paths": self.paths,
            "questions": self.questions,
            "n_shared_questions": self.n_shared,
            "runs": self.runs,
            "correlation": self.correlation,
            "paired": self.paired,
        }


def _row_correlations(x: Float[np.ndarray, "b n"], y: Float[np.ndarray, "b n"]) -> Float[np.ndarray, "b 2"]:
    """Pearson and Spearman (average ranks) of each row pair; NaN where a row does not vary."""

    def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        denom = np.sqrt((a**2).sum(1) * (b**2).sum(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), np.nan)

    return np.stack([pearson(x, y), pearson(sps.rankdata(x, axis=1), sps.rankdata(y, axis=1))], axis=1)


def _correlation(tables: dict[str, dict[str, Any]], entries: dict[str, list[dict]], seed: int) -> dict[str, Any]:
    """Flip rate vs Dangerous share across runs: r, ρ, and CIs over runs and over questions."""
    names = [n for n in tables if tables[n]["quadrants_available"]]
    flip = np.array([tables[n]["flip_rate"]["value"] for n in names])
    danger = np.array([tables[n]["quadrants"]["Dangerous"]["share"]["value"] for n in names])
    out: dict[str, Any] = {
        "n_runs": len(names),
        "runs": names,
        "flip_rate": flip.tolist(),
        "dangerous_share": danger.tolist(),
    }
    if len(names) < 3 or np.ptp(flip) == 0 or np.ptp(danger) == 0:
        out["note"] = "needs at least 3 runs whose flip rates and Dangerous shares vary"
        return out
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(names), (2000, len(names)))
    over_runs = _row_correlations(flip[pick], danger[pick])
    resampled_flip, resampled_danger = [], []  # per run, 1000 resamples of its questions at once
    for n in names:
        flips_n = np.array([e["flip"] for e in entries[n]], dtype=np.float64)
        danger_n = np.array(
            [e["quadrant"] == "Dangerous" for e in entries[n] if e["quadrant"] is not None], dtype=np.float64
        )
        resampled_flip.append(flips_n[rng.integers(0, len(flips_n), (1000, len(flips_n)))].mean(1))
        resampled_danger.append(danger_n[rng.integers(0, len(danger_n), (1000, len(danger_n)))].mean(1))
    over_questions = _row_correlations(np.stack(resampled_flip, 1), np.stack(resampled_danger, 1))
    r, rho = _row_correlations(flip[None], danger[None])[0]
    for k, (name, value) in enumerate((("pearson", r), ("spearman", rho))):
        runs_ci = np.nanquantile(over_runs[:, k], [0.025, 0.975])
        questions_ci = np.nanquantile(over_questions[:, k], [0.025, 0.975])
        out[name] = {
            "value": float(value),
            "runs_ci": [float(runs_ci[0]), float(runs_ci[1])],
            "questions_ci": [float(questions_ci[0]), float(questions_ci[1])],
        }
    out["p_pearson"] = float(sps.pearsonr(flip, danger).pvalue)
    if len(names) < 10:
        out["note"] = f"an estimate from {len(names)} runs (fewer than 10)"
    return out


def _paired(entries: dict[str, dict[str, dict]]) -> list[dict[str, Any]]:
    """McNemar on flipping and on Dangerous membership for each pair of runs sharing questions."""
    tests = []
    for first, second in itertools.combinations(entries, 2):
        shared = sorted(set(entries[first]) & set(entries[second]))
        if not shared:
            continue
        a, b = entries[first], entries[second]
        judged = [q for q in shared if a[q]["quadrant"] is not None and b[q]["quadrant"] is not None]
        tests.append(
            {
                "first": first,
                "second": second,
                "n_shared": len(shared),
                "flips": mcnemar(np.array([a[q]["flip"] for q in shared]), np.array([b[q]["flip"] for q in shared])),
                "correct": mcnemar(
                    np.array([a[q]["correct"] for q in shared]), np.array([b[q]["correct"] for q in shared])
                ),
                "dangerous": mcnemar(
                    np.array([a[q]["quadrant"] == "Dangerous" for q in judged], dtype=bool),
                    np.array([b[q]["quadrant"] == "Dangerous" for q in judged], dtype=bool),
                ),
            }
        )
    return tests


def _store(run: str | Path) -> Path:
    path = Path(run)
    store = path / "results.jsonl" if path.is_dir() else path
    header = read_header(store)
    if header.get("kind") != "flip-evaluation":
        raise FlipscopeError(f"{str(store)!r} is not an evaluation store (kind {header.get('kind')!r})")
    return store


def _restrict(entries: dict[str, dict[str, dict]], questions: str) -> tuple[dict[str, dict[str, dict]], int]:
    """Apply the question mode; returns the entries to use and how many questions all runs share."""
    if questions not in QUESTION_MODES:
        raise FlipscopeError(f"questions mode {questions!r} is unknown; expected one of {QUESTION_MODES}")
    ids = {name: set(e) for name, e in entries.items()}
    shared = set.intersection(*ids.values())
    first = next(iter(ids))
    differing = [name for name in ids if ids[name] != ids[first]]
    if questions == "same" and differing:
        raise FlipscopeError(
            f"runs {first!r} and {differing[0]!r} evaluate different questions ({len(ids[first])} and "
            f"{len(ids[differing[0]])}, {len(ids[first] & ids[differing[0]])} shared); compare on the questions "
            "all runs share (--questions shared) or each run on its own (--questions own)"
        )
    if questions == "shared":
        if not shared:
            raise FlipscopeError("the runs share no question; compare each on its own (--questions own)")
        entries = {name: {q: e[q] for q in sorted(shared)} for name, e in entries.items()}
    return entries, len(shared)


def compare_runs(
    runs: Sequence[str | Path],
    *,
    names: Sequence[str] | None = None,
    questions: str = "same",
    removed: str | None = None,
    seed: int = 0,
) -> Comparison:
    """Compare evaluation runs (output folders of `flipscope evaluate`, or their results.jsonl).

    Args:
        names: One label per run (default: each run's folder name).
        questions: `same` (refuse runs whose questions differ), `shared` (all on the questions every
            run has) or `own` (each run on its own; paired tests on the questions a pair shares).
        removed: The image-removed condition for reliance (see `question_table`).

    Raises:
        FlipscopeError: fewer than two runs, a path that is not an evaluation store, repeated names,
            or questions that differ under `same`.
    """
    if len(runs) < 2:
        raise FlipscopeError(f"compare needs at least two runs, got {len(runs)}")
    stores = [_store(run) for run in runs]
    labels = list(names) if names is not None else [s.parent.name for s in stores]
    if len(labels) != len(stores) or len(set(labels)) != len(labels):
        raise FlipscopeError(f"run names {labels} must be unique, one per run; pass names for each")
    entries = {label: question_table(iter_rows(store), removed) for label, store in zip(labels, stores, strict=True)}
    entries, n_shared = _restrict(entries, questions)
    tables = {name: run_table(list(e.values()), seed) for name, e in entries.items()}
    listed = {name: list(e.values()) for name, e in entries.items()}
    return Comparison(
        names=labels,
        paths=[str(s) for s in stores],
        questions=questions,
        n_shared=n_shared,
        runs=tables,
        correlation=_correlation(tables, listed, seed),
        paired=_paired(entries),
    )
