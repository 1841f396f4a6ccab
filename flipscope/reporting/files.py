"""Figures to disk: interactive HTML (plotly.js once, beside them) with a JSON of the settings
each was made with, and PNGs through kaleido when a Chrome/Chromium is installed — never
downloading one: without it the PNGs are skipped and the reason is returned."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from flipscope.data.atomic import write_atomic, write_json
from flipscope.errors import FlipscopeError

__all__ = ["PNG_SIZE", "png_renderer", "save_figures"]

PNG_SIZE = (1000, 600)


def png_renderer() -> tuple[bool, str]:
    """Whether PNGs can be rendered here, and if not why (kaleido needs an installed Chrome/Chromium;
    `BROWSER_PATH` names one explicitly)."""
    try:
        import kaleido  # noqa: F401
        from choreographer.utils import get_browser_path
    except ImportError:
        return False, "kaleido is not installed (pip install kaleido==1.5.0)"
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    path = get_browser_path(names)
    if not path or not shutil.which(path):
        return False, "no Chrome/Chromium found (install Debian's 'chromium' or set BROWSER_PATH)"
    return True, path


def save_figures(
    figures: Mapping[str, go.Figure],
    directory: str | Path,
    settings: Mapping[str, Any] | None = None,
    *,
    png: bool = True,
    size: tuple[int, int] = PNG_SIZE,
) -> dict[str, Any]:
    """Write each figure as `name.html` (interactive; plotly.js once as `plotly.min.js` beside
    them), `name.json` (the settings it was made with) and, when `png` and a browser is found,
    `name.png` (all in one kaleido session).

    Returns:
        `{"html": [...], "png": [...], "png_skipped": reason or None}`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"html": [], "png": [], "png_skipped": None}
    if figures and not (directory / "plotly.min.js").exists():  # once per folder, as plotly's write_html does
        from plotly.offline import get_plotlyjs

        write_atomic(directory / "plotly.min.js", get_plotlyjs())
    for name, fig in figures.items():
        html = directory / f"{name}.html"
        write_atomic(html, fig.to_html(include_plotlyjs="directory", full_html=True, div_id=name))
        write_json(directory / f"{name}.json", {"figure": name, **(settings or {})})
        written["html"].append(html)
    ok, why = png_renderer() if png else (False, "PNG output was turned off")
    if not ok:
        written["png_skipped"] = why
        return written
    import kaleido

    width, height = size
    jobs = [
        {
            "fig": fig,
            "path": str(directory / f".{name}.tmp.png"),  # renamed into place once all are drawn
            "opts": {"format": "png", "width": width, "height": height},
        }
        for name, fig in figures.items()
    ]
    kaleido.start_sync_server(mathjax=False, silence_warnings=True)
    try:
        errors = kaleido.write_fig_from_object_sync(jobs, cancel_on_error=True)
    finally:
        kaleido.stop_sync_server(silence_warnings=True)
    if errors:
        raise FlipscopeError(f"PNG rendering failed: {errors[0]}")
    written["png"] = [
        Path(job["path"]).replace(directory / f"{name}.png") for name, job in zip(figures, jobs, strict=True)
    ]
    return written
