"""Figures of a run comparison (`Comparison.to_dict()` in, `plotly` figures out): the trap across runs,
quadrant shares per run, accuracy and entropy per quadrant, and the screening ROC curves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flipscope.experiments.summary import QUADRANTS
from flipscope.reporting.plots import LAYOUT, _error

__all__ = ["comparison_figures", "quadrant_quality", "quadrant_shares", "screening_roc", "trap_scatter"]

QUADRANT_COLORS = {"Ideal": "#2f855a", "Fragile": "#d69e2e", "Dangerous": "#c53030", "Worst": "#4a5568"}


def trap_scatter(c: Mapping[str, Any], title: str = "Flip rate against the Dangerous share, per run") -> go.Figure:
    """One point per run with its CIs, the least-squares line and r (when there are ≥ 3 runs)."""
    names = [n for n in c["names"] if c["runs"][n].get("quadrants_available", True)]  # imported without blank: none
    flip = [c["runs"][n]["flip_rate"] for n in names]
    danger = [c["runs"][n]["quadrants"]["Dangerous"]["share"] for n in names]
    fig = go.Figure(
        go.Scatter(
            x=[f["value"] for f in flip],
            y=[d["value"] for d in danger],
            error_x=_error(flip),
            error_y=_error(danger),
            mode="markers+text",
            text=names,
            textposition="top center",
            marker=dict(size=11, color="#2b6cb0"),
            name="runs",
        )
    )
    pearson = c["correlation"].get("pearson")
    if pearson is not None:
        x, y = np.array([f["value"] for f in flip]), np.array([d["value"] for d in danger])
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 20)
        low, high = pearson["runs_ci"]
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=slope * grid + intercept,
                mode="lines",
                line=dict(dash="dash", color="#718096"),
                name=f"r = {pearson['value']:.2f} [{low:.2f}, {high:.2f}] over runs",
            )
        )
    fig.update_layout(title=title, xaxis_title="flip rate", yaxis_title="Dangerous share", **LAYOUT)
    return fig


def quadrant_shares(c: Mapping[str, Any], title: str = "Quadrant shares per run") -> go.Figure:
    """Stacked bars: each run's questions split into Ideal, Fragile, Dangerous and Worst."""
    names = c["names"]
    fig = go.Figure(
        [
            go.Bar(
                x=names,
                y=[c["runs"][n]["quadrants"][q]["share"]["value"] for n in names],
                name=q,
                marker_color=QUADRANT_COLORS[q],
            )
            for q in QUADRANTS
        ]
    )
    fig.update_layout(title=title, barmode="stack", yaxis_title="share of questions", **LAYOUT)
    return fig


def quadrant_quality(c: Mapping[str, Any], title: str = "Accuracy and entropy per quadrant") -> go.Figure:
    """Grouped bars with CIs: each quadrant's accuracy (left) and mean answer entropy (right), per run."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "entropy of the original answer (bits)"))
    for q in QUADRANTS:
        for col, key in ((1, "accuracy"), (2, "mean_entropy_bits")):
            blocks = [c["runs"][n]["quadrants"][q][key] for n in c["names"]]
            shown = [b if b["n"] else {"value": None, "low": 0, "high": 0} for b in blocks]
            fig.add_trace(
                go.Bar(
                    x=c["names"],
                    y=[b["value"] for b in shown],
                    error_y=_error([b if b["value"] is not None else {"value": 0, "low": 0, "high": 0} for b in shown]),
                    name=q,
                    legendgroup=q,
                    showlegend=col == 1,
                    marker_color=QUADRANT_COLORS[q],
                ),
                row=1,
                col=col,
            )
    fig.update_layout(title=title, barmode="group", **LAYOUT)
    return fig


def screening_roc(c: Mapping[str, Any], title: str = "Finding the Dangerous answers") -> go.Figure:
    """Per run, the ROC curve of a confidence screen (flag the least confident first) and the one
    point of the text-only check."""
    fig = go.Figure()
    for k, name in enumerate(c["names"]):
        screen = c["runs"][name].get("screening")
        if screen is None or screen["uncertainty_auroc"]["value"] is None:
            continue
        color = f"hsl({(k * 67) % 360}, 60%, 45%)"
        roc = screen["uncertainty_roc"]
        fig.add_trace(
            go.Scatter(
                x=roc["fpr"],
                y=roc["tpr"],
                mode="lines",
                line=dict(color=color),
                name=f"{name}: confidence, AUROC {screen['uncertainty_auroc']['value']:.2f}",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[1 - screen["text_only_specificity"]["value"]],
                y=[screen["text_only_sensitivity"]["value"]],
                mode="markers",
                marker=dict(color=color, size=12, symbol="diamond"),
                name=f"{name}: one text-only forward",
            )
        )
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#a0aec0"), name="chance"))
    fig.update_layout(
        title=title, xaxis_title="share of other answers flagged", yaxis_title="share of Dangerous found", **LAYOUT
    )
    return fig


def comparison_figures(c: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Every figure of a comparison, by file name."""
    return {
        "trap": trap_scatter(c),
        "quadrant_shares": quadrant_shares(c),
        "quadrant_quality": quadrant_quality(c),
        "screening": screening_roc(c),
    }
