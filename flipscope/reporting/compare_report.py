"""The comparison page and its sentences: every claim chosen by a test on the numbers."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from flipscope.data.atomic import write_atomic
from flipscope.experiments.summary import QUADRANTS
from flipscope.reporting.format import fmt, num
from flipscope.reporting.report import STYLE, _figure, _reading, _table

__all__ = ["PAPER_R", "correlation_sentence", "screening_sentence", "write_compare_report"]

PAPER_R = -0.89  # flip rate against the Dangerous share over 10 model × dataset runs ("Consistent but Dangerous")


def correlation_sentence(correlation: Mapping[str, Any]) -> str:
    """What the runs say about flip rate against the Dangerous share, by whether r's CI over runs excludes 0."""
    pearson = correlation.get("pearson")
    n = correlation["n_runs"]
    if pearson is None:
        return f"No correlation across runs can be estimated: {correlation.get('note', 'too few runs')}."
    low, high = pearson["runs_ci"]
    estimate = f"r = {num(pearson['value'], '.2f')} [{num(low, '.2f')}, {num(high, '.2f')}] over {n} runs"
    if n < 10:
        estimate += " (from fewer than 10 runs)"
    paper = f"; the paper measured r = {PAPER_R} over 10 runs"
    if high < 0:
        return f"Runs that flip less put more questions in the Dangerous quadrant: {estimate}{paper}."
    if low > 0:
        return f"Runs that flip more also put more questions in the Dangerous quadrant: {estimate}{paper}."
    return f"No correlation between flip rate and the Dangerous share can be claimed: {estimate}{paper}."


def screening_sentence(name: str, screen: Mapping[str, Any] | None) -> str:
    """Whether a confidence screen finds run `name`'s Dangerous answers, by the AUROC's CI against 0.5."""
    if screen is None:
        return f"{name}: no margins in the store, so confidence screening cannot be measured."
    auroc = screen["uncertainty_auroc"]
    if auroc["value"] is None:
        which = "every" if screen["dangerous_share"]["value"] == 1 else "no"
        return f"{name}: {which} answer is Dangerous; nothing to screen."
    text_only = f"one text-only forward finds all of them, flagging {_flagged(screen)} of the others"
    shown = f"AUROC {num(auroc['value'], '.2f')} [{num(auroc['low'], '.2f')}, {num(auroc['high'], '.2f')}]"
    if auroc["high"] < 0.5:
        return (
            f"{name}: Dangerous answers are more confident than the rest, so a screen that flags uncertain "
            f"answers finds them less often than chance ({shown}); {text_only}."
        )
    if auroc["low"] > 0.5:
        return (
            f"{name}: a screen that flags uncertain answers finds Dangerous ones above chance ({shown}); {text_only}."
        )
    return f"{name}: confidence does not tell Dangerous answers apart ({shown}); {text_only}."


def _flagged(screen: Mapping[str, Any]) -> str:
    """Share of non-Dangerous answers the text-only check flags (1 − specificity), with its CI."""
    s = screen["text_only_specificity"]
    return fmt({"value": 1 - s["value"], "low": 1 - s["high"], "high": 1 - s["low"], "n": s["n"]})


def _run_rows(c: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name in c["names"]:
        t = c["runs"][name]
        shares = [fmt(t["quadrants"][q]["share"]) for q in QUADRANTS]
        rows.append(
            [
                name,
                str(t["n_questions"]),
                fmt(t["flip_rate"]),
                fmt(t["accuracy"]),
                fmt(t["text_only_agreement"]),
                *shares,
            ]
        )
    return rows


def _paired_rows(c: Mapping[str, Any]) -> list[list[str]]:
    return [
        [f"{t['first']} vs {t['second']}", str(t["n_shared"]),
         f"{t['flips']['only_first']} / {t['flips']['only_second']}", num(t["flips"]["p"], ".3g"),
         f"{t['dangerous']['only_first']} / {t['dangerous']['only_second']}", num(t["dangerous"]["p"], ".3g")]
        for t in c["paired"]
    ]  # fmt: skip


def write_compare_report(path: str | Path, c: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> Path:
    """Write the self-contained comparison page of `c` (`Comparison.to_dict()`) with its figures."""
    screens = " ".join(screening_sentence(n, c["runs"][n].get("screening")) for n in c["names"])
    header = ["run", "questions", "flip rate", "accuracy", "text-only agreement", *QUADRANTS]
    paired = [
        "runs",
        "shared questions",
        "flip only in first / second",
        "McNemar p",
        "Dangerous only in first / second",
        "McNemar p",
    ]
    body = (
        "<h1>flipscope: the false reliability trap across runs</h1>"
        f"<p>{len(c['names'])} runs, questions compared as <code>{html.escape(c['questions'])}</code> "
        f"({c['n_shared_questions']} shared by all). Estimates are bootstrap 95% CIs over questions.</p>"
        + _table(header, _run_rows(c))
        + "<h2>Flip rate against the Dangerous share</h2>"
        + _figure(figures, "trap") + _reading(html.escape(correlation_sentence(c["correlation"])))
        + _figure(figures, "quadrant_shares") + _figure(figures, "quadrant_quality")
        + "<h2>Can confidence see the Dangerous answers?</h2>"
        + _figure(figures, "screening") + _reading(html.escape(screens))
        + "<h2>Paired tests (runs that share questions)</h2>"
        + (_table(paired, _paired_rows(c)) if c["paired"] else "<p>No two runs share a question.</p>")
    )  # fmt: skip
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>flipscope comparison</title>'
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>{body}</body></html>"
    )
    return write_atomic(path, page)
