"""An organism sweep in words, a table and a figure (`summarize_sweep` results in): sentences
chosen by the sweep's tests, one row per regime, and the flip rates with one dot per seed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

from flipscope.organism.sweep_stats import ALPHA
from flipscope.reporting.format import MIN_CASES
from flipscope.reporting.plots import LAYOUT

__all__ = ["sweep_figure", "sweep_rows", "sweep_sentences"]

_WHERE = {"flip_rate_seen": "seen", "flip_rate_withheld": "withheld"}
COLUMNS = ("regime", "seeds", "flip rate, seen", "flip rate, withheld", "accuracy", "text-only agreement")


def _few(n: int) -> str:
    return f" ({n} seeds per regime, fewer than {MIN_CASES})" if n < MIN_CASES else ""


def _comparison_sentence(c: Mapping[str, Any]) -> str:
    where, n = _WHERE[c["measure"]], min(c["n_a"], c["n_b"])
    first, second, delta = ("a", "b", c["delta"]) if c["delta"] >= 0 or c["q"] >= ALPHA else ("b", "a", -c["delta"])
    numbers = (f"{c['mean_' + first]:.1%} vs {c['mean_' + second]:.1%}; Mann–Whitney p = {c['p']:.2g}, "
               f"BH q = {c['q']:.2g}, Cliff's δ = {delta:+.2f}")  # fmt: skip
    if c["q"] < ALPHA:
        return (f"Trained {c[first]}, the organism flips more on {where} phrasings than trained {c[second]} "
                f"({numbers}){_few(n)}.")  # fmt: skip
    return f"{c['a']} and {c['b']} are not separated on {where} phrasings ({numbers}){_few(n)}."


def _paired_sentence(regime: str, s: Mapping[str, Any]) -> str:
    counts = f"higher on withheld in {s['withheld_higher']} of {s['n']} seeds, on seen in {s['seen_higher']}"
    if s["p"] < ALPHA:
        side = "withheld" if s["withheld_higher"] > s["seen_higher"] else "seen"
        return f"Trained {regime}, flips are more frequent on {side} phrasings ({counts}; Wilcoxon p = {s['p']:.2g})."
    test = f"Wilcoxon p = {s['p']:.2g}"
    if 2.0 / 2 ** s["n"] >= ALPHA:  # the smallest two-sided p of n paired values is 2 / 2^n
        test += f"; with {s['n']} seeds no Wilcoxon p can fall below {ALPHA:g}"
    return f"Trained {regime}, seen and withheld phrasings are not separated ({counts}; {test}){_few(s['n'])}."


def sweep_sentences(summary: Mapping[str, Any]) -> list[str]:
    """One sentence per regime comparison and per regime's seen-vs-withheld test, each saying
    "more" only when its test holds at `ALPHA` (BH-adjusted across the regime comparisons)."""
    sentences = [_comparison_sentence(c) for c in summary["comparisons"]]
    for regime, s in summary["regimes"].items():
        if s["seen_vs_withheld"] is not None:
            sentences.append(_paired_sentence(regime, s["seen_vs_withheld"]))
    return sentences


def _cell(spread: Mapping[str, Any] | None) -> str:
    """`mean ± sd [min–max]` in percent, `n/a` where the measure has no pairs."""
    if spread is None:
        return "n/a"
    sd = "" if spread["sd"] is None else f" ± {spread['sd']:.1%}"
    return f"{spread['mean']:.1%}{sd} [{spread['min']:.1%}–{spread['max']:.1%}]"


def sweep_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """One row per regime under `COLUMNS`: every measure as mean ± sd over seeds, with its range."""
    return [
        [name, str(s["n_seeds"])]
        + [
            _cell(s[m]) for m in ("flip_rate_seen", "flip_rate_withheld", "accuracy", "text_only_agreement")
        ]  # fmt: skip
        for name, s in summary["regimes"].items()
    ]


def sweep_figure(summary: Mapping[str, Any], title: str = "Flip rate by training-phrasing regime") -> go.Figure:
    """Per regime, the flip rate on seen and on withheld phrasings: one dot per seed over a box."""
    fig = go.Figure()
    for measure, color in (("flip_rate_seen", "#2b6cb0"), ("flip_rate_withheld", "#c05621")):
        xs, ys, text = [], [], []
        for name, s in summary["regimes"].items():
            if s[measure] is None:
                continue
            xs += [name] * len(s[measure]["values"])
            ys += s[measure]["values"]
            text += [f"seed {seed}" for seed in s["seeds"]]
        fig.add_trace(go.Box(x=xs, y=ys, text=text, name=_WHERE[measure] + " phrasings", marker_color=color,
                             boxpoints="all", jitter=0.4, pointpos=0, line_width=1))  # fmt: skip
    fig.update_layout(**LAYOUT, title=title, boxmode="group", yaxis_title="flip rate (pairs)",
                      yaxis_tickformat=".0%", xaxis_title="training-phrasing regime")  # fmt: skip
    return fig
