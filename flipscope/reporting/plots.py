"""Figures of every stage: results in, `plotly.graph_objects.Figure` out (never shown here).

Each function takes what the stage writes (patch rows, an evaluation summary, a discovery's
layer table, clamp comparison points) and returns one figure; `flipscope.reporting.files`
writes them to disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flipscope.errors import FlipscopeError

__all__ = [
    "clamp_tradeoff",
    "feature_activation",
    "flip_rates",
    "framing_entry",
    "layer_profile",
    "margin_recovery",
    "quadrant_map",
    "recovery_distribution",
]

COLORS = {"original": "#2b6cb0", "paraphrase": "#c53030", "patched": "#2f855a", "control": "#718096"}
FAMILY_COLORS = {"original": "#2b6cb0", "neutral": "#319795", "formal": "#805ad5", "leading": "#dd6b20"}
OTHER_COLORS = ("#c53030", "#718096", "#d69e2e", "#2f855a")


def _family_color(family: str, k: int) -> str:
    """One colour per question family, the same in every figure."""
    return FAMILY_COLORS.get(family, OTHER_COLORS[k % len(OTHER_COLORS)])


LAYOUT = dict(template="plotly_white", font=dict(size=13), margin=dict(l=70, r=30, t=70, b=60))


def _rows_of(rows: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    chosen = [r for r in rows if r["kind"] == kind]
    if kind == "flip" and not chosen:
        raise FlipscopeError("patch rows hold no flip cases (rows need kind='flip' with m_orig, m_para, m_patched)")
    return chosen


def _recovery(rows: Sequence[Mapping[str, Any]], key: str = "m_patched") -> np.ndarray:
    m_orig = np.array([r["m_orig"] for r in rows], dtype=np.float64)
    m_para = np.array([r["m_para"] for r in rows], dtype=np.float64)
    return (np.array([r[key] for r in rows], dtype=np.float64) - m_para) / (m_orig - m_para)


def _error(estimates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Plotly error bars from estimate dicts with value, low, high."""
    return dict(
        type="data",
        symmetric=False,
        array=[e["high"] - e["value"] for e in estimates],
        arrayminus=[e["value"] - e["low"] for e in estimates],
    )


def margin_recovery(rows: Sequence[Mapping[str, Any]], title: str = "Margin recovery per flip") -> go.Figure:
    """Per flip, the yes−no margin of the original, the paraphrase and the patched paraphrase,
    with an arrow from paraphrase to patched; flips sorted by recovery (best at the top)."""
    flips = _rows_of(rows, "flip")
    order = np.argsort(_recovery(flips))
    flips = [flips[i] for i in order]
    y = list(range(len(flips)))
    names = [str(r["case"]) for r in flips]
    fig = go.Figure()
    xs: list[float | None] = []
    ys: list[float | None] = []
    for i, r in enumerate(flips):
        xs += [r["m_para"], r["m_patched"], None]
        ys += [i, i, None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#a0aec0", width=1), showlegend=False))
    angles = [90 if r["m_patched"] >= r["m_para"] else 270 for r in flips]
    for key, label, symbol in (("m_orig", "original", "circle"), ("m_para", "paraphrase", "x"),
                               ("m_patched", "patched", "arrow")):  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=[r[key] for r in flips],
                y=y,
                mode="markers",
                name=label,
                marker=dict(color=COLORS[label], symbol=symbol, size=7, angle=angles if symbol == "arrow" else 0),
                customdata=names,
                hovertemplate="%{customdata}<br>" + label + " margin %{x:.3f}<extra></extra>",
            )
        )
    fig.add_vline(x=0, line=dict(color="black", width=1, dash="dot"))
    fig.update_layout(
        title=title,
        height=max(450, min(1400, 4 * len(flips) + 150)),
        xaxis_title="yes − no logit margin (> 0: yes)",
        yaxis=dict(title=f"flip cases ({len(flips)}), sorted by recovery", showticklabels=False),
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
        **LAYOUT,
    )
    return fig


def recovery_distribution(rows: Sequence[Mapping[str, Any]], title: str = "Recovery, with its controls") -> go.Figure:
    """Left: recovery over flips (and the matched control features', when the rows have it).
    Right: the margin change the same patch causes on the non-flip controls."""
    flips = _rows_of(rows, "flip")
    controls = _rows_of(rows, "control")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("flips: recovery of the margin", "non-flip controls: margin change")
    )
    fig.add_trace(
        go.Histogram(x=_recovery(flips), name="framing feature(s)", marker_color=COLORS["patched"], opacity=0.75),
        row=1,
        col=1,
    )
    if "m_control_feature" in flips[0]:
        fig.add_trace(
            go.Histogram(
                x=_recovery(flips, "m_control_feature"),
                name="matched control features",
                marker_color=COLORS["control"],
                opacity=0.75,
            ),
            row=1,
            col=1,
        )
    if controls:
        change = [r["m_patched"] - r["m_para"] for r in controls]
        fig.add_trace(
            go.Histogram(x=change, name="same patch on controls", marker_color=COLORS["paraphrase"], opacity=0.75),
            row=1,
            col=2,
        )
    fig.update_layout(title=title, barmode="overlay", **LAYOUT)
    fig.update_xaxes(title_text="(m_patched − m_para) / (m_orig − m_para)", row=1, col=1)
    fig.update_xaxes(title_text="m_patched − m_para (logits)", row=1, col=2)
    fig.update_yaxes(title_text="cases", row=1, col=1)
    return fig


def quadrant_map(summary: Mapping[str, Any], title: str = "Consistency × image reliance") -> go.Figure:
    """The four quadrants of an evaluation `summary` (`evaluate.summarize`) as bubbles sized by
    count and coloured by accuracy, each labelled with its share, accuracy and entropy."""
    quadrants = summary.get("by_quadrant")
    if not quadrants:
        raise FlipscopeError("summary has no 'by_quadrant' block; evaluate with the image removed (e.g. 'blank')")
    place = {"Ideal": (1, 1), "Fragile": (1, 0), "Dangerous": (0, 1), "Worst": (0, 0)}
    names = list(place)
    counts = np.array([quadrants[n]["n_questions"] for n in names], dtype=np.float64)
    size = 30 + 90 * np.sqrt(counts / max(counts.max(), 1))

    def value(block: Mapping[str, Any]) -> float | None:
        return None if block["n"] == 0 else block["value"]

    accuracy = [value(quadrants[n]["accuracy"]) for n in names]
    text = []
    for n in names:
        q = quadrants[n]
        acc, ent = value(q["accuracy"]), value(q["mean_entropy_bits"])
        text.append(
            f"<b>{n}</b><br>{q['n_questions']} ({q['share']['value']:.0%})<br>"
            f"acc {'—' if acc is None else f'{acc:.2f}'}<br>H {'—' if ent is None else f'{ent:.2f}'} bits"
        )
    fig = go.Figure(
        go.Scatter(
            x=[place[n][0] for n in names],
            y=[place[n][1] for n in names],
            mode="markers+text",
            text=text,
            textposition="middle right",
            marker=dict(
                size=size,
                color=[a if a is not None else 0.0 for a in accuracy],
                cmin=0,
                cmax=1,
                colorscale="RdYlGn",
                colorbar=dict(title="accuracy"),
                line=dict(color="black", width=1),
            ),
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        title=title,
        xaxis=dict(range=[-0.5, 1.9], tickvals=[0, 1], ticktext=["not image-reliant", "image-reliant"]),
        yaxis=dict(range=[-0.5, 1.5], tickvals=[0, 1], ticktext=["inconsistent", "consistent"]),
        **LAYOUT,
    )
    return fig


def flip_rates(
    cells: Sequence[Mapping[str, Any]], title: str = "Flip rate by finding and paraphrase family"
) -> go.Figure:
    """Grouped bars with 95% CIs from cells `{finding, family, value, low, high}` (share of a
    family's paraphrases whose answer differs from the original's, per finding)."""
    if not cells:
        raise FlipscopeError("no flip-rate cells to plot")
    findings = sorted({c["finding"] for c in cells})
    families = list(dict.fromkeys(c["family"] for c in cells))
    fig = go.Figure()
    for k, family in enumerate(families):
        chosen = {c["finding"]: c for c in cells if c["family"] == family}
        present = [f for f in findings if f in chosen]
        fig.add_trace(
            go.Bar(
                x=present,
                y=[chosen[f]["value"] for f in present],
                error_y=_error([chosen[f] for f in present]),
                name=family,
                marker_color=_family_color(family, k),
            )
        )
    fig.update_layout(
        title=title, barmode="group", yaxis=dict(title="paraphrases flipped", rangemode="tozero"), **LAYOUT
    )
    return fig


def feature_activation(
    cells: Sequence[Mapping[str, Any]],
    title: str = "Top features' activation by question family",
    labels: Mapping[int, str] | None = None,
) -> go.Figure:
    """Grouped bars with 95% CIs from cells `{feature, family, value, low, high}`: each feature's
    mean activation at the last prompt position, per question family; with `labels` (feature →
    discovery label), each bar group says what the feature is (`framing`, `answer readout`, ...)."""
    if not cells:
        raise FlipscopeError("no feature-activation cells to plot")
    features = list(dict.fromkeys(int(c["feature"]) for c in cells))
    families = list(dict.fromkeys(c["family"] for c in cells))
    fig = go.Figure()
    for k, family in enumerate(families):
        chosen = {int(c["feature"]): c for c in cells if c["family"] == family}
        fig.add_trace(
            go.Bar(
                x=[f"feature {f}" + (f"<br>({labels[f]})" if labels and f in labels else "") for f in features],
                y=[chosen[f]["value"] for f in features],
                error_y=_error([chosen[f] for f in features]),
                name=family,
                marker_color=_family_color(family, k),
            )
        )
    fig.update_layout(title=title, barmode="group", yaxis_title="mean SAE activation", **LAYOUT)
    return fig


def clamp_tradeoff(
    points: Sequence[Mapping[str, Any]], title: str = "Clamping: flip rate against accuracy"
) -> go.Figure:
    """Points `{label, kind, flip_rate, accuracy}` (estimates with value/low/high; `kind` is
    'baseline', 'clamp' or another intervention): clamp values joined as a curve, the baseline and
    other interventions as separate markers, 95% CIs both ways."""
    if not points:
        raise FlipscopeError("no clamp points to plot")
    fig = go.Figure()
    groups = {
        "clamp": ("clamp values", "circle", COLORS["patched"]),
        "baseline": ("model as is", "star", "black"),
    }
    others = [kind for kind in dict.fromkeys(p["kind"] for p in points) if kind not in groups]
    groups.update({kind: (kind, "diamond", OTHER_COLORS[k % len(OTHER_COLORS)]) for k, kind in enumerate(others)})
    for kind in dict.fromkeys(p["kind"] for p in points):
        chosen = [p for p in points if p["kind"] == kind]
        name, symbol, color = groups[kind]
        fig.add_trace(
            go.Scatter(
                x=[p["flip_rate"]["value"] for p in chosen],
                y=[p["accuracy"]["value"] for p in chosen],
                error_x=_error([p["flip_rate"] for p in chosen]),
                error_y=_error([p["accuracy"] for p in chosen]),
                mode="lines+markers+text" if kind == "clamp" else "markers+text",
                text=[p["label"] for p in chosen],
                textposition="top center" if kind == "clamp" else "bottom center",
                name=name,
                marker=dict(symbol=symbol, size=11, color=color),
                line=dict(color=color),
            )
        )
    low = min(p["accuracy"]["low"] for p in points)
    fig.update_layout(
        title=title,
        xaxis=dict(title="flip rate", rangemode="tozero"),
        yaxis=dict(title="accuracy (original questions)", range=[max(0.0, low - 0.1), 1.04]),
        **LAYOUT,
    )
    return fig


def layer_profile(
    layers: Sequence[Mapping[str, Any]],
    recovery: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Flip prediction by layer",
) -> go.Figure:
    """Per layer, the flip-vs-control AUC of the DiffMean projection (`layer_auc_sweep` rows:
    hook, auc, low, high; a layer whose AUC is None, too few flips or controls to fit, is left
    out) and, optionally, the mean recovery of original-value patching there (`{layer, value, low,
    high}`)."""
    if not layers:
        raise FlipscopeError("no layer rows to plot")
    index = [int(r["hook"].split(".")[1]) for r in layers]
    scored = [r for r in layers if r["auc"] is not None]
    fig = go.Figure(
        go.Scatter(
            x=[int(r["hook"].split(".")[1]) for r in scored],
            y=[r["auc"] for r in scored],
            error_y=_error([{"value": r["auc"], "low": r["low"], "high": r["high"]} for r in scored]),
            mode="lines+markers",
            name="flip vs control AUC",
            line=dict(color=COLORS["original"]),
        )
    )
    if recovery:
        fig.add_trace(
            go.Scatter(
                x=[int(r["layer"]) for r in recovery],
                y=[r["value"] for r in recovery],
                error_y=_error(recovery),
                mode="lines+markers",
                name="recovery, original state patched in",
                line=dict(color=COLORS["patched"], dash="dash"),
            )
        )
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot"))
    fig.update_layout(
        title=title,
        xaxis=dict(title="layer (hook_resid_post)", tickvals=index),
        yaxis=dict(title="AUC / recovery", range=[0, 1.05]),
        **LAYOUT,
    )
    return fig


def framing_entry(
    summary: Mapping[str, Any],
    recovery: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Where the framing enters",
) -> go.Figure:
    """Share of the framing's effect restored per layer (`hook_resid_pre`) when the clean run is
    put back at each group of positions (`UpstreamTrace.summary()`), and, beside it, the mean
    recovery of original-value patching at the last position after each layer (`{layer, value,
    low, high}` rows, plotted at layer + 1: the input of the next layer)."""
    profile = summary["profile"]
    if not profile:
        raise FlipscopeError("no traced layers to plot")
    layers = [int(r["layer"]) for r in profile]
    styles = {"framing words": COLORS["paraphrase"], "rest of question": "#a0aec0", "last position": COLORS["original"]}
    fig = go.Figure()
    for group in summary["groups"]:
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[r[group]["value"] for r in profile],
                error_y=_error([r[group] for r in profile]),
                mode="lines+markers",
                name=f"clean run restored at the {group}",
                line=dict(color=styles.get(group, "#4a5568")),
            )
        )
    if recovery:
        fig.add_trace(
            go.Scatter(
                x=[int(r["layer"]) + 1 for r in recovery],
                y=[r["value"] for r in recovery],
                error_y=_error(recovery),
                mode="lines+markers",
                name="original state patched in at the last position",
                line=dict(color=COLORS["patched"], dash="dash"),
            )
        )
    fig.update_layout(
        title=title,
        xaxis=dict(title="layer L (its input, hook_resid_pre)", tickvals=sorted({*layers, *(x + 1 for x in layers)})),
        yaxis=dict(title="share of the framing's effect", range=[-0.05, 1.1]),
        **LAYOUT,
    )
    return fig
