"""The guard's figures and page (`guard_study` results in, plotly figures and HTML out): the detector
× target AUROC table with CIs, the abstention curve, and sentences chosen by tests on the numbers."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from flipscope.data.atomic import write_atomic
from flipscope.experiments.detectors import DETECTORS, TARGETS
from flipscope.experiments.guard import guard_sentences
from flipscope.reporting.format import fmt
from flipscope.reporting.html_parts import figure, reading, table
from flipscope.reporting.plots import LAYOUT, _error
from flipscope.reporting.report import STYLE

__all__ = ["abstention_figure", "auroc_figure", "auroc_rows", "guard_figures", "write_guard_report"]

PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280")
COST = {"margin": "1 pass", "probe": "1 pass + fit", "dispersion": "k passes", "blank": "2 passes", "swap": "2 passes"}


def auroc_rows(study: Mapping[str, Any]) -> list[list[str]]:
    """One row per detector: its cost and its AUROC with CI per target ("defines the label" where
    the detector is the target's own reading)."""
    rows = []
    for detector in DETECTORS:
        if detector not in study["auroc"]:
            continue
        cells = []
        for target in TARGETS:
            a = study["auroc"][detector].get(target)
            cells.append("defines the label" if a is None else fmt(a) + f" ({a['n_positive']} positive)")
        rows.append([detector, COST[detector], *cells])
    return rows


def auroc_figure(studies: Mapping[str, Mapping[str, Any]], title: str = "Which detector catches what") -> go.Figure:
    """AUROC with CIs per detector, one panel per target, one bar group per run; 0.5 is chance."""
    fig = make_subplots(rows=1, cols=len(TARGETS), subplot_titles=[t.replace("_", "-") for t in TARGETS])
    for index, (name, study) in enumerate(studies.items()):
        color = PALETTE[index % len(PALETTE)]
        for col, target in enumerate(TARGETS, start=1):
            found = [(d, study["auroc"][d][target]) for d in DETECTORS if target in study["auroc"].get(d, {})]
            found = [(d, a) for d, a in found if a["value"] is not None]
            fig.add_trace(
                go.Bar(
                    x=[d for d, _ in found],
                    y=[a["value"] for _, a in found],
                    error_y=_error([a for _, a in found]),
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    marker_color=color,
                ),
                row=1,
                col=col,
            )
            fig.add_hline(y=0.5, line_dash="dot", line_color="#718096", row=1, col=col)
    fig.update_yaxes(range=[0, 1], title_text="AUROC (held out)", row=1, col=1)
    fig.update_layout(title=title, barmode="group", **LAYOUT)
    return fig


def abstention_figure(
    studies: Mapping[str, Mapping[str, Any]], title: str = "Abstaining on the least confident"
) -> go.Figure:
    """Coverage against the retained answers' accuracy and flip-prone share, per run."""
    fig = go.Figure()
    for index, (name, study) in enumerate(studies.items()):
        curve, color = study["abstention"], PALETTE[index % len(PALETTE)]
        x = [p["coverage"] for p in curve]
        fig.add_trace(go.Scatter(x=x, y=[p["accuracy"] for p in curve], mode="lines+markers", line=dict(color=color),
                                 name=f"{name}: accuracy"))  # fmt: skip
        fig.add_trace(go.Scatter(x=x, y=[p["flip_prone"] for p in curve], mode="lines+markers",
                                 line=dict(dash="dash", color=color), name=f"{name}: flip-prone share"))  # fmt: skip
    fig.update_layout(title=title, xaxis_title="coverage (share of answers kept)", yaxis_title="share", **LAYOUT)
    return fig


def guard_figures(studies: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    return {"guard_auroc": auroc_figure(studies), "guard_abstention": abstention_figure(studies)}


def _gate_rows(study: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for gate, r in study["realised_recall"].items():
        target, threshold = r["target"].replace("_", "-"), study["thresholds"][gate]
        rows.append([gate, target, f"{threshold:.3g}", fmt(r), f"{r['flagged_share']:.0%}"])
    return rows


def guard_section(name: str, study: Mapping[str, Any]) -> str:
    """One run's tables and sentences."""
    missing = study.get("no_opposite_film", 0)
    note = f" {missing} question(s) had no opposite-label film and carry no image label." if missing else ""
    prevalence = ", ".join(f"{t.replace('_', '-')} {fmt(study['prevalence'][t])}" for t in TARGETS)
    return (
        f"<h2>{html.escape(name)}</h2><p>{study['n_calibration']} questions calibrate, {study['n_held_out']} are held "
        f"out; on those: {html.escape(prevalence)}.{html.escape(note)}</p>"
        + table(["detector", "cost", *[f"AUROC, {t.replace('_', '-')}" for t in TARGETS]], auroc_rows(study))
        + table(
            ["gate", "target", "threshold", f"recall (target {study['recall_target']:.2f})", "abstains on"],
            _gate_rows(study),
        )  # fmt: skip
        + reading(html.escape(" ".join(guard_sentences(study, name))))
    )


def write_guard_report(
    path: str | Path, studies: Mapping[str, Mapping[str, Any]], figures: Mapping[str, go.Figure], names: Sequence[str]
) -> Path:
    """Write the self-contained guard page for the runs in `studies` (name → `guard_study` result)."""
    body = (
        "<h1>flipscope: guarding answers</h1><p>Each detector scores every held-out answer; AUROC with a bootstrap "
        "95% CI over questions, 0.5 is chance. The image label is whether the answer survives a film of the same "
        "finding with the opposite truth.</p>"
        + figure(figures, "guard_auroc") + figure(figures, "guard_abstention")
        + "".join(guard_section(n, studies[n]) for n in names)
    )  # fmt: skip
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>flipscope guard</title>'
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>{body}</body></html>"
    )
    return write_atomic(path, page)
