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

__all__ = ["PAPER_R", "correlation_sentence", "paired_sentence", "screening_sentence", "write_compare_report"]

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


def paired_sentence(test: Mapping[str, Any], alpha: float = 0.05) -> str:
    """Whether two runs flip (and answer correctly) on different shared questions, by exact McNemar."""
    first, second, n = test["first"], test["second"], test["n_shared"]
    parts = []
    for key, what, noun in (("flips", "flips", "flipping"), ("correct", "answers correctly", "correctness")):
        t = test.get(key)
        if t is None:
            continue
        shown = f"{t['only_first']} vs {t['only_second']} discordant questions, McNemar p = {num(t['p'], '.3g')}"
        if t["p"] < alpha:
            more = first if t["only_first"] > t["only_second"] else second
            parts.append(f"{more} {what} on more of them ({shown})")
        else:
            parts.append(f"no difference in {noun} can be claimed ({shown})")
    return f"{first} vs {second} on {n} shared questions: " + "; ".join(parts) + "."


def _flagged(screen: Mapping[str, Any]) -> str:
    """Share of non-Dangerous answers the text-only check flags (1 − specificity), with its CI."""
    s = screen["text_only_specificity"]
    return fmt({"value": 1 - s["value"], "low": 1 - s["high"], "high": 1 - s["low"], "n": s["n"]})


def _run_rows(c: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name in c["names"]:
        t = c["runs"][name]
        available = t.get("quadrants_available", True)
        shares = [fmt(t["quadrants"][q]["share"]) if available else "unavailable" for q in QUADRANTS]
        rows.append(
            [
                name,
                str(t["n_questions"]),
                fmt(t["flip_rate"]),
                fmt(t["pairwise_disagreement"]),
                fmt(t["accuracy"]),
                fmt(t["yes_rate"]) if "yes_rate" in t else "",
                fmt(t["text_only_agreement"]) if available else "unavailable",
                *shares,
            ]
        )
    return rows


def _family_rows(c: Mapping[str, Any]) -> list[list[str]]:
    families = sorted({f for n in c["names"] for f in c["runs"][n].get("by_strategy", {})})
    return [
        [family, *(fmt(c["runs"][n]["by_strategy"][family]) if family in c["runs"][n].get("by_strategy", {}) else ""
                   for n in c["names"])]
        for family in families
    ]  # fmt: skip


def unavailable_sentence(c: Mapping[str, Any]) -> str:
    """Which runs have no quadrants (no image-removed condition), in words; empty when all have them."""
    missing = [n for n in c["names"] if not c["runs"][n].get("quadrants_available", True)]
    if not missing:
        return ""
    return (
        f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no image-removed condition, so image "
        "reliance and the quadrants are unavailable there; they sit out the trap's correlation."
    )


def _paired_rows(c: Mapping[str, Any]) -> list[list[str]]:
    return [
        [f"{t['first']} vs {t['second']}", str(t["n_shared"]),
         f"{t['flips']['only_first']} / {t['flips']['only_second']}", num(t["flips"]["p"], ".3g"),
         f"{t['correct']['only_first']} / {t['correct']['only_second']}" if "correct" in t else "",
         num(t["correct"]["p"], ".3g") if "correct" in t else "",
         f"{t['dangerous']['only_first']} / {t['dangerous']['only_second']}" if t["dangerous"]["n"] else "unavailable",
         num(t["dangerous"]["p"], ".3g") if t["dangerous"]["n"] else ""]
        for t in c["paired"]
    ]  # fmt: skip


def write_compare_report(path: str | Path, c: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> Path:
    """Write the self-contained comparison page of `c` (`Comparison.to_dict()`) with its figures."""
    screens = " ".join(screening_sentence(n, c["runs"][n].get("screening")) for n in c["names"])
    header = ["run", "questions", "flip rate", "pairwise disagreement", "accuracy", "yes-rate",
              "text-only agreement", *QUADRANTS]  # fmt: skip
    paired = [
        "runs",
        "shared questions",
        "flip only in first / second",
        "McNemar p",
        "correct only in first / second",
        "McNemar p",
        "Dangerous only in first / second",
        "McNemar p",
    ]
    missing = unavailable_sentence(c)
    pairs = " ".join(paired_sentence(t) for t in c["paired"])
    body = (
        "<h1>flipscope: the false reliability trap across runs</h1>"
        f"<p>{len(c['names'])} runs, questions compared as <code>{html.escape(c['questions'])}</code> "
        f"({c['n_shared_questions']} shared by all). Estimates are bootstrap 95% CIs over questions.</p>"
        + _table(header, _run_rows(c))
        + (_reading(html.escape(missing)) if missing else "")
        + "<h2>Flip rate by paraphrase family</h2>"
        + _table(["family", *c["names"]], _family_rows(c))
        + "<h2>Flip rate against the Dangerous share</h2>"
        + _figure(figures, "trap") + _reading(html.escape(correlation_sentence(c["correlation"])))
        + _figure(figures, "quadrant_shares") + _figure(figures, "quadrant_quality")
        + "<h2>Can confidence see the Dangerous answers?</h2>"
        + _figure(figures, "screening") + _reading(html.escape(screens))
        + "<h2>Paired tests (runs that share questions)</h2>"
        + (_table(paired, _paired_rows(c)) + _reading(html.escape(pairs))
           if c["paired"] else "<p>No two runs share a question.</p>")
    )  # fmt: skip
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>flipscope comparison</title>'
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>{body}</body></html>"
    )
    return write_atomic(path, page)
