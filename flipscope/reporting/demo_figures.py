"""The demo's figures, drawn from its `summary` (and the files it names): the demo calls
`build_figures`, and so does `analyses/figures.py` to redraw them from a finished run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flipscope.reporting.format import edit_label

__all__ = ["build_figures", "layer_recovery"]


def layer_recovery(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Mean recovery over flips, with its CI, of original-value patching at each layer."""
    from flipscope.experiments.patching import summarize_patch

    layers = sorted({r["variant"] for r in rows})
    return [
        {
            "layer": int(layer),
            **summarize_patch([r for r in rows if r["variant"] == layer], seed)["flips"]["mean_recovery"],
        }
        for layer in layers
    ]


def _clamp_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    base = report["baseline"]["overall"]
    points = [{"label": "as is", "kind": "baseline", "flip_rate": base["flip_rate"], "accuracy": base["accuracy"]}]
    for entry in report["interventions"]:
        o = entry["summary"]["overall"]
        if "clamp" in entry["description"]:
            (value,) = set(entry["description"]["clamp"]["values"].values())
            label, kind = f"{value:g}", "clamp"
        else:
            label = kind = edit_label(entry["description"])
        points.append({"label": label, "kind": kind, "flip_rate": o["flip_rate"], "accuracy": o["accuracy"]})
    return points


def build_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Every figure of a demo run, from its `summary` (and the files it names): the demo calls
    this, and so does `analyses/figures.py` to redraw them from a finished run. A run with no
    flips has the evaluation's two figures only."""
    from flipscope.data.store import iter_rows
    from flipscope.experiments.summary import flip_rate_cells
    from flipscope.reporting import plots

    files = summary["files"]
    seed = summary["settings"]["seed"]
    evaluation = {
        "quadrants": plots.quadrant_map(summary["evaluation"], title="Consistency × image reliance (held-out films)"),
        "flip_rates": plots.flip_rates(flip_rate_cells(iter_rows(files["evaluation"]), seed=seed)),
    }
    if not summary["flipbank"]["n_flips"]:  # nothing to explain: the evaluation's figures alone
        return evaluation
    rows = json.loads(Path(files["patch_discovered"]).read_text())["cases"]
    chosen = summary["patching"]["discovered"]["setup"]["features"]
    feature = summary["clamping"]["feature"]
    upstream = summary["upstream"]
    entry = (
        {"framing_entry": plots.framing_entry(upstream, summary["patching"]["layers"])} if upstream["profile"] else {}
    )
    return (
        entry
        | _site_figures(summary)
        | {
            "margin_recovery": plots.margin_recovery(
                rows, title=f"Removing features {chosen}: margin per flip, original → paraphrase → patched"
            ),
            "recovery_distribution": plots.recovery_distribution(
                rows, title=f"Recovery for features {chosen}, and its controls"
            ),
            **evaluation,
            "feature_activation": plots.feature_activation(
                summary["feature_activation"],
                labels={int(r["feature"]): r["label"] for r in summary["discovery"]["top"] if "label" in r},
            ),
            "clamp_tradeoff": plots.clamp_tradeoff(
                _clamp_points(summary["clamping"]), title=f"Clamping feature {feature}: flip rate against accuracy"
            ),
            "layer_auc": plots.layer_profile(summary["discovery"]["layers"], summary["patching"]["layers"]),
        }
    )


def _site_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The heads the trace traced, the lens, and the two sites' recoveries when the demo read a
    second site."""
    from flipscope.reporting import plots_sites

    out = {}
    if (summary["upstream"].get("heads") or {}).get("layers"):
        out["head_trace"] = plots_sites.head_trace(summary["upstream"]["heads"])
    if (summary.get("lens") or {}).get("layers"):
        out["lens_divergence"] = plots_sites.lens_divergence(summary["lens"])
    entry = (summary.get("site") or {}).get("entry")
    if entry:
        main = summary["patching"]["discovered"]
        sites = [
            {"site": f"{entry['hook']} (entry)", "recovery": entry["patching"]["flips"]["mean_recovery"],
             "control": entry["patching"].get("matched_control_feature", {}).get("mean_recovery")},
            {"site": f"{main['setup']['hook']} (the SAE's layer)", "recovery": main["flips"]["mean_recovery"],
             "control": main.get("matched_control_feature", {}).get("mean_recovery")},
        ]  # fmt: skip
        out["site_recovery"] = plots_sites.site_recovery(sites, title="Removing the five framing features at each site")
    counts = [
        {"site": f"{c['hook']} ({role})", "counts": c["counts"]}
        for role, c in (("entry", (entry or {}).get("count")), ("the SAE's layer", summary["patching"].get("count")))
        if c
    ]
    if counts:
        out["feature_count"] = plots_sites.feature_count(counts)
    return out
