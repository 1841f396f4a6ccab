"""The HTML pieces every report page is made of: a table of escaped cells and a reading."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["figure", "reading", "table"]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], paper_rows: int = 0) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="paper"' if i >= len(rows) - paper_rows else ""
        cells = "".join(
            f'<td class="num">{html.escape(str(c))}</td>' if k else f"<td>{html.escape(str(c))}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def reading(text: str) -> str:
    return f'<p class="reading">{text}</p>'


def figure(figures: Mapping[str, Any], name: str) -> str:
    """One figure of `figures` as an HTML fragment (plotly.js is inlined once by the page)."""
    return figures[name].to_html(full_html=False, include_plotlyjs=False, div_id=name, config={"responsive": True})
