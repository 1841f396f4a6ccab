"""A cure audit in a table, a figure, sentences and a page (`audit_cures` results in): per cure the
paired change of every measure against the base with its CI and McNemar p, the trap figure
(change in flips against change in Dangerous answers) and the verdict in words."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from flipscope.data.atomic import write_atomic
from flipscope.experiments.audit import NON_INFERIORITY
from flipscope.reporting.format import MIN_CASES
from flipscope.reporting.guard_report import PALETTE
from flipscope.reporting.html_parts import figure, reading, table
from flipscope.reporting.plots import LAYOUT, _error
from flipscope.reporting.report import STYLE

__all__ = ["audit_figure", "audit_header", "audit_rows", "audit_sentences", "write_audit_report"]

LABELS = {
    "flip_rate": "flip rate",
    "flip_rate_withheld": "flip rate, withheld families",
    "accuracy": "accuracy",
    "dangerous_share": "Dangerous share (blank)",
    "text_only_agreement": "text-only agreement",
    "dangerous_opposite": "Dangerous share, opposite film",
    "survives_opposite": "answer survives the opposite film",
}
VERDICTS = {
    "cured": "fewer flips without more Dangerous answers",
    "trap": "fewer flips, but more Dangerous answers: the trap",
    "unresolved": "fewer flips; more Dangerous answers are not ruled out",
    "no_fewer_flips": "no fewer flips",
    "more_flips": "more flips",
}


def _change(p: Mapping[str, Any]) -> str:
    c = p["change"]
    return f"{c['value']:+.1%} [{c['low']:+.1%}, {c['high']:+.1%}] (McNemar p = {p['mcnemar_p']:.2g})"


def audit_header(audit: Mapping[str, Any]) -> list[str]:
    return ["model", *[LABELS[m] for m in audit["base"]], "into Dangerous (from Worst / image-reliant)",
            "verdict (blank)", "verdict (opposite film)"]  # fmt: skip


def _verdict(cure: Mapping[str, Any], key: str) -> str:
    return "n/a" if cure.get(key) is None else VERDICTS[cure[key]]


def audit_rows(audit: Mapping[str, Any]) -> list[list[str]]:
    """The base's rates, then per cure each measure's rate and paired change, where its new
    Dangerous answers came from, and its verdicts."""
    rows = [["base", *[f"{v:.1%}" for v in audit["base"].values()], "", "", ""]]
    for cure in audit["cures"]:
        cells = [f"{cure['rates'][m]:.1%}; {_change(cure['paired'][m])}" for m in audit["base"]]
        moved = f"{cure['into_dangerous']['from_worst']} / {cure['into_dangerous']['from_image_reliant']}"
        rows.append([cure["name"], *cells, moved, _verdict(cure, "verdict"), _verdict(cure, "verdict_opposite")])
    return rows


def _cured_sentence(audit: Mapping[str, Any], key: str, what: str) -> str:
    cured = [c["name"] for c in audit["cures"] if c.get(key) == "cured"]
    bound = f"upper bound ≤ {NON_INFERIORITY:+.0%}"
    if cured:
        return f"Fewer flips without more Dangerous answers {what} ({bound}): {', '.join(cured)}."
    return f"No cure lowers the flip rate without more Dangerous answers {what}, as the intervals stand."


def audit_sentences(audit: Mapping[str, Any]) -> list[str]:
    """One sentence per cure, its verdicts' words chosen by the intervals (`verdict`), with the
    numbers they rest on; then which cures, if any, lower flips without more Dangerous answers,
    by the blank and by the opposite film."""
    n = audit["n_questions"]
    few = f" (from only {n} questions)" if n < MIN_CASES else ""
    out = []
    for cure in audit["cures"]:
        p, moved = cure["paired"], cure["into_dangerous"]
        origin = f"{moved['from_worst']} questions in from Worst, {moved['from_image_reliant']} from image-reliant"
        blank = f"Dangerous by the blank {_change(p['dangerous_share'])} ({origin}): {VERDICTS[cure['verdict']]}"
        text = f"{cure['name']}: flips {_change(p['flip_rate'])}, accuracy {_change(p['accuracy'])}; {blank}"
        if cure.get("verdict_opposite") is not None:
            text += (f"; Dangerous by the opposite film {_change(p['dangerous_opposite'])}: "
                     f"{VERDICTS[cure['verdict_opposite']]}")  # fmt: skip
        out.append(text + few + ".")
    out.append(_cured_sentence(audit, "verdict", "by the blank (the paper's Dangerous)"))
    if any(c.get("verdict_opposite") is not None for c in audit["cures"]):
        out.append(_cured_sentence(audit, "verdict_opposite", "by the opposite-label film"))
    return out


def audit_figure(audit: Mapping[str, Any], title: str = "Fewer flips, or the trap?") -> go.Figure:
    """Per cure, the change in flip rate (x) against the change in Dangerous share (y) by the blank
    (left) and by the opposite-label film (right), with 95% CIs; a cure belongs left of 0 and not above it."""
    panels = [m for m in ("dangerous_share", "dangerous_opposite") if m in audit["base"]]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[LABELS[m] for m in panels], shared_yaxes=True)
    for index, cure in enumerate(audit["cures"]):
        color = PALETTE[index % len(PALETTE)]
        for col, measure in enumerate(panels, start=1):
            x, y = cure["paired"]["flip_rate"]["change"], cure["paired"][measure]["change"]
            fig.add_trace(go.Scatter(x=[x["value"]], y=[y["value"]], error_x=_error([x]), error_y=_error([y]),
                                     mode="markers+text", text=[cure["name"]], textposition="top right",
                                     name=cure["name"], legendgroup=cure["name"], showlegend=col == 1,
                                     marker=dict(size=11, color=color)), row=1, col=col)  # fmt: skip
            fig.add_hline(y=0, line_dash="dot", line_color="#718096", row=1, col=col)
            fig.add_vline(x=0, line_dash="dot", line_color="#718096", row=1, col=col)
    fig.update_layout(**LAYOUT, title=title)
    fig.update_xaxes(tickformat="+.0%", title_text="change in flip rate (paired)")
    fig.update_yaxes(tickformat="+.0%", title_text="change in Dangerous share", row=1, col=1)
    return fig


def write_audit_report(path: str | Path, audit: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> Path:
    """Write the self-contained audit page."""
    withheld = ", ".join(audit["withheld"]) or "none"
    body = (
        "<h1>flipscope: auditing cures against the trap</h1>"
        f"<p>{audit['n_questions']} held-out questions, each asked in every wording with the image and with a gray "
        f"blank and with a film of the same finding whose truth is the opposite; families no cure trained on: "
        f"{html.escape(withheld)}. Each change is paired per question against the base (bootstrap 95% CI, "
        "McNemar's exact test). Dangerous: consistent, and the same answer without the image (the paper's, by the "
        "blank) or on the opposite film (an answer that does not read the film).</p>"
        + figure(figures, "trap") + table(audit_header(audit), audit_rows(audit))
        + reading(html.escape(" ".join(audit_sentences(audit))))
    )  # fmt: skip
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>flipscope audit</title>'
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>{body}</body></html>"
    )
    return write_atomic(path, page)
