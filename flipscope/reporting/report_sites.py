"""The report's two sites side by side: the main SAE's and the one nearest where the trace says the
framing enters (`flipscope.experiments.sites`), with the sentence `claims.site_comparison` chooses."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from flipscope.reporting.claims import lens_reading, site_comparison, wording_bound_reading
from flipscope.reporting.feature_claims import feature_sentence
from flipscope.reporting.format import control_text, fmt
from flipscope.reporting.html_parts import figure as html_figure
from flipscope.reporting.html_parts import reading, table

__all__ = ["site_section"]


def _row(role: str, hook: str, discovery: Mapping[str, Any], patch: Mapping[str, Any]) -> list[str]:
    flips = patch["flips"]
    replication = (discovery.get("framing") or {}).get("replication") or {}
    carried = len(replication.get("replicated", [])) if replication else "n/a"
    return [
        f"{role}: {hook}",
        str(carried),
        f"{discovery['patched']} ({discovery['patched_by']})",
        fmt(flips["mean_recovery"]),
        f"{round(flips['share_reversed']['value'] * flips['n'])}/{flips['n']}",
        control_text(patch),
        fmt(patch.get("same_push_control", {}).get("mean_recovery")),
        _controls_cell(patch.get("controls", {})),
    ]


def _controls_cell(controls: Mapping[str, Any]) -> str:
    """The non-flips' mean |margin change|, and against their own wording's when it was measured."""
    text = fmt(controls.get("mean_abs_margin_change"))
    bound = controls.get("wording_bound")
    return f"{text}; their wording's {fmt(bound['wording'])}: {bound['verdict']}" if bound else text


def site_section(s: Mapping[str, Any], figures: Mapping[str, Any]) -> str:
    """The lens, then the main site and the entry site: framing features, what removing them
    recovers, and both controls."""

    def figure(name: str) -> str:
        return html_figure(figures, name) if name in figures else ""

    lens = (
        "<h3>The logit lens</h3><p>Each layer's residual stream at the answer position read as if it were the last "
        "(the final norm, then the yes and no rows of the unembedding): how far each flip's paraphrase moves from its "
        "original there, beside the same-family non-flips.</p>"
        f"{reading(html.escape(lens_reading(s.get('lens'))))}{figure('lens_divergence')}"
    )
    site = s.get("site")
    sentence = html.escape(site_comparison(site, s["discovery"], s["patching"]))
    head = lens + "<h3>Where the framing is a feature, and where it is the answer</h3>"
    if not site or not site.get("entry"):
        return head + reading(sentence) + _where_they_fire(s) + _counts(s, figure)
    entry = site["entry"]
    main_hook = s["patching"]["discovered"]["setup"]["hook"]
    rows = [
        _row("entry (chosen by the trace)", entry["hook"], entry, entry["patching"]),
        _row("the SAE's layer (the paper's mid-depth)", main_hook, s["discovery"], s["patching"]["discovered"]),
    ]
    grid = table(
        ["site", "framing features (beyond the null, replicated)", "removed", "mean recovery [CI]", "flips reversed",
         "matched control features (own Δf): recovery",
         "the features' push along the controls' rows: recovery",
         "non-flips: mean |margin change| (against their own framing words')"],
        rows,
    )  # fmt: skip
    why = html.escape(site["choice"]["reason"])
    measured = entry["patching"].get("controls", {})  # a bound of None: no non-flip had framing words
    controls = (
        reading(html.escape(wording_bound_reading(measured["wording_bound"], entry["hook"])))
        if "wording_bound" in measured
        else ""
    )
    return (
        f"{head}<p>The SAE nearest where the framing enters was chosen from the trace: {why} Discovery and patching "
        "ran there as at the SAE's layer, on the same FlipBank.</p>"
        f"{grid}{reading(sentence)}{controls}{figure('site_recovery')}{_where_they_fire(s)}{_counts(s, figure)}"
    )


def _where_they_fire(s: Mapping[str, Any]) -> str:
    """Each site's first removed feature: how the paraphrase moves it on the question and at the
    answer position, with the page that shows where every removed feature fires."""
    sites = s.get("dashboards") or {}
    if not sites:
        return ""
    parts = []
    for name, d in sites.items():
        first, found = next(iter(d["features"].items()))
        parts.append(
            reading(html.escape(f"At {d['hook']}: {feature_sentence(first, found)}"))
            + f'<p><a href="dashboard_{html.escape(name)}.html">Where each removed feature at {html.escape(d["hook"])} '
            "fires, token by token</a></p>"
        )
    return (
        "<h3>Where the removed features fire</h3><p>Each feature read at every token of the bank's prompts; each "
        "case's paraphrase minus its original, on the question's tokens and at the last position, with a bootstrap "
        "CI over cases.</p>" + "".join(parts)
    )


def _counts(s: Mapping[str, Any], figure: Any) -> str:
    """How many features each site needs: the first k of discovery's features removed together."""
    counts = [c for c in (((s.get("site") or {}).get("entry") or {}).get("count"), s["patching"].get("count")) if c]
    if not counts:
        return ""
    readings = "".join(
        reading(html.escape(f"At {c['hook']}, features ranked by {c['ranked_by']}: {c['needed']['reading']}"))
        for c in counts
    )
    return (
        "<h3>How many features undo the flips</h3><p>Discovery's features removed together, the first one, then "
        "the first two, and so on, each count beside as many matched control features. Whether those features "
        "carry the framing is discovery's claim above; this says how many of them the flips need.</p>"
        f"{readings}{figure('feature_count')}"
    )
