"""Evidence maps as pictures: each wording's occlusion map laid over its film, original beside
paraphrase (`flip_evidence` rows in, a plotly figure out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flipscope.model.image_layout import Grid
from flipscope.model.images import load_image
from flipscope.reporting.plots import LAYOUT

__all__ = ["overlay_figure"]


def overlay_figure(rows: Sequence[Mapping[str, Any]], title: str = "Where the margin comes from") -> go.Figure:
    """One row per case (`pair_evidence` rows; `image`: a path or the film's pixels): the film in
    gray with the original's and the paraphrase's occlusion maps over it, each cell on the pixels
    its token read (the row's `grid`; red: the cell supports *yes*; blue: *no*), titled with each
    wording's margin and the case's `label` when it has one."""
    titles = [f"{r.get('label', '') + ': ' if r.get('label') and k == 'original' else ''}{r[k][:44]} "
              f"(m = {r['margin_' + k]:+.2f})" for r in rows for k in ("original", "paraphrase")]  # fmt: skip
    fig = make_subplots(rows=len(rows), cols=2, subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.08)
    for i, row in enumerate(rows, start=1):
        film = np.asarray(load_image(row["image"]).convert("L"), dtype=np.float64)  # a path or the pixels
        scale = max(np.abs(row["map_original"]).max(), np.abs(row["map_paraphrase"]).max(), 1e-9)
        for j, key in enumerate(("map_original", "map_paraphrase"), start=1):
            overlay = Grid.from_dict(row["grid"]).to_pixels(np.asarray(row[key]), *film.shape)
            fig.add_trace(go.Heatmap(z=film, colorscale="gray", showscale=False, hoverinfo="skip"), row=i, col=j)
            heat = go.Heatmap(z=overlay, colorscale="RdBu_r", zmin=-scale, zmax=scale, opacity=0.45,
                              showscale=i == 1 and j == 2, colorbar=dict(title="Δmargin"))  # fmt: skip
            fig.add_trace(heat, row=i, col=j)
            n = (i - 1) * 2 + j  # this subplot's axes: x, y for the first, then x2, y2, ...
            fig.update_yaxes(scaleanchor=f"x{'' if n == 1 else n}", row=i, col=j)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(**{**LAYOUT, "margin": dict(l=20, r=20, t=80, b=20)}, title=title, height=300 * len(rows) + 100)
    return fig
