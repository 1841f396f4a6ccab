"""Figures of where the framing lives: the heads that carry it and where they look, the logit lens
per layer, the two SAE sites side by side, and how many features each site needs.

Results in, `plotly.graph_objects.Figure` out, like `flipscope.reporting.plots`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flipscope.errors import FlipscopeError
from flipscope.reporting.plots import COLORS, LAYOUT, _error

__all__ = ["feature_count", "head_trace", "lens_divergence", "site_recovery"]

LOOK_COLORS = ("#c53030", "#feb2b2", "#2b6cb0", "#cbd5e0")  # framing words, rest of question, image, rest


def head_trace(
    heads: Mapping[str, Any], title: str = "Which heads carry the framing, and where they look"
) -> go.Figure:
    """Per traced head (`HeadTrace.summary()`): the share of the framing's effect that restoring it
    alone brings back and corrupting it alone takes away, with CIs and the bar a carrier clears
    (left); where its attention from the answer position falls (right, stacked over `LOOKS`)."""
    from flipscope.experiments.heads import LOOKS

    traced = [(f"{row['layer']}.{h['head']}", h) for row in heads.get("layers") or [] for h in row["heads"]]
    if not traced:
        raise FlipscopeError("no traced heads to plot")
    names = [name for name, _ in traced]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("share of the framing's effect", "attention from the answer"))
    for key, label, colour in (
        ("restored", "restored alone", COLORS["patched"]),
        ("removed", "removed alone", "#dd6b20"),
    ):
        shares = [h[key] for _, h in traced]
        fig.add_trace(
            go.Bar(x=names, y=[e["value"] for e in shares], error_y=_error(shares), name=label, marker_color=colour),
            row=1, col=1,
        )  # fmt: skip
    fig.add_hline(y=heads["bar"], line=dict(color="gray", dash="dash"), row=1, col=1)
    base = [0.0] * len(traced)
    for where, colour in zip(LOOKS, LOOK_COLORS, strict=True):  # stacked: one offset group, each on the last
        mass = [h["looks"][where]["value"] for _, h in traced]
        fig.add_trace(
            go.Bar(x=names, y=mass, base=base, offsetgroup="looks", name=where, marker_color=colour),
            row=1, col=2,
        )  # fmt: skip
        base = [b + m for b, m in zip(base, mass, strict=True)]
    fig.update_xaxes(title_text="head (layer.head)")
    fig.update_yaxes(title_text="share", row=1, col=1)
    fig.update_yaxes(title_text="attention weight", range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title, barmode="group", **LAYOUT)
    return fig


def lens_divergence(summary: Mapping[str, Any], title: str = "Where flips diverge: the logit lens") -> go.Figure:
    """Per layer (`LensTrajectory.summary()`): the mean |lens(paraphrase) − lens(original)| of flips
    and of same-family non-flips (left), and their ratio with its CI (right; 1 = no more than a
    wording that kept its answer; dashed, the ratio that choosing flips for crossing zero gives)."""
    rows = summary["layers"]
    if not rows:
        raise FlipscopeError("no lens layers to plot")
    layers = [int(r["layer"]) for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean |Δ lens margin|", "flips ÷ non-flips"))
    fig.add_trace(
        go.Scatter(x=layers, y=[r["flips"] for r in rows], mode="lines+markers", name="flips",
                   line=dict(color=COLORS["paraphrase"])),
        row=1, col=1,
    )  # fmt: skip
    if all(r.get("controls") is not None for r in rows):
        fig.add_trace(
            go.Scatter(x=layers, y=[r["controls"] for r in rows], mode="lines+markers",
                       name="same-family non-flips", line=dict(color=COLORS["control"])),
            row=1, col=1,
        )  # fmt: skip
    ratios = [r["ratio"] for r in rows if r.get("ratio")]
    if len(ratios) == len(rows):
        fig.add_trace(
            go.Scatter(x=layers, y=[r["value"] for r in ratios], error_y=_error(ratios), mode="lines+markers",
                       name="ratio [95% CI]", line=dict(color=COLORS["original"])),
            row=1, col=2,
        )  # fmt: skip
        fig.add_hline(y=1.0, line=dict(color="gray", dash="dot"), row=1, col=2)
    if all(r.get("selection") for r in rows):
        fig.add_trace(
            go.Scatter(x=layers, y=[r["selection"]["ratio"] for r in rows], mode="lines", name="by selection alone",
                       line=dict(color="gray", dash="dash")),
            row=1, col=2,
        )  # fmt: skip
    fig.update_xaxes(title_text="layer (hook_resid_post)", tickvals=layers)
    fig.update_yaxes(title_text="logits", row=1, col=1)
    fig.update_yaxes(title_text="ratio", rangemode="tozero", row=1, col=2)
    fig.update_layout(title=title, **LAYOUT)
    return fig


def site_recovery(sites: Sequence[Mapping[str, Any]], title: str = "Removing features at each site") -> go.Figure:
    """Per site (`{site, recovery, control}` with estimate dicts): the mean margin recovery of the
    features removed there and of the matched control features, with CIs."""
    if not sites:
        raise FlipscopeError("no sites to plot")
    names = [s["site"] for s in sites]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(x=names, y=[s["recovery"]["value"] for s in sites], error_y=_error([s["recovery"] for s in sites]),
               name="the framing features removed", marker_color=COLORS["patched"])
    )  # fmt: skip
    controls = [s.get("control") for s in sites]
    if all(controls):
        fig.add_trace(
            go.Bar(x=names, y=[c["value"] for c in controls], error_y=_error(controls),
                   name="matched control features", marker_color=COLORS["control"])
        )  # fmt: skip
    fig.update_layout(title=title, barmode="group", yaxis=dict(title="mean recovery of the yes−no margin"), **LAYOUT)
    return fig


def feature_count(
    sites: Sequence[Mapping[str, Any]], target: float = 0.5, title: str = "How many features undo the flips"
) -> go.Figure:
    """Per site (`{site, counts}`, the counts of `summarize_counts`): the flips' mean recovery with
    the first k of a ranking's features removed together, against k, with CIs; dotted beside it, as
    many matched control features; dashed, the share the features must recover to undo the flips."""
    if not sites or not all(s["counts"] for s in sites):
        raise FlipscopeError("no feature counts to plot")
    palette = [COLORS["patched"], COLORS["paraphrase"], COLORS["original"]]
    fig = go.Figure()
    for i, site in enumerate(sites):
        colour = palette[i % len(palette)]
        counts = site["counts"]
        ks = [c["k"] for c in counts]
        recovery = [c["flips"]["mean_recovery"] for c in counts]
        fig.add_trace(
            go.Scatter(x=ks, y=[r["value"] for r in recovery], error_y=_error(recovery), mode="lines+markers",
                       name=f"{site['site']}: the first k features", line=dict(color=colour))
        )  # fmt: skip
        controls = [c.get("matched_control_feature") for c in counts]
        if all(controls):
            fig.add_trace(
                go.Scatter(x=ks, y=[c["mean_recovery"]["value"] for c in controls], mode="lines",
                           name=f"{site['site']}: as many matched controls", line=dict(color=colour, dash="dot"))
            )  # fmt: skip
    fig.add_hline(y=target, line=dict(color="gray", dash="dash"))
    fig.update_layout(
        title=title, xaxis=dict(title="features removed together (k, in discovery's order)", dtick=1),
        yaxis=dict(title="mean recovery of the yes−no margin"), **LAYOUT,
    )  # fmt: skip
    return fig
