"""What a demo run found, as one summary: every number the report and the figures show, and the
files they come from."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flipscope.reporting.demo_figures import layer_recovery

__all__ = ["PAPER", "demo_summary", "has_flips"]

PAPER = {
    "model": "MedGemma 4B (google/medgemma-4b-it), MIMIC-CXR questions",
    "flip_rate_range": "8–58% across six medical VLMs",
    "flipbank": {"n_flips": 158, "yes_to_no": 94, "no_to_yes": 64},
    "feature": "GemmaScope 2 feature 3818, layer 17 of 34 (blocks.17.hook_resid_post)",
    "pearson_r": 0.71,
    "peak_layer_auc": 0.76,
    "patch_mean_recovery": 0.448,
    "patch_reversed": "23/158",
    "patch_controls_margin_change": 0.03,
    "clamp_flip_rate": [0.156, 0.108],
    "clamp_accuracy": [0.782, 0.769],
    "clamp_text_only_agreement": [0.664, 0.631],
}


def has_flips(run: Any) -> bool:
    """Whether the run's FlipBank holds a flip (else the stages that explain flips are skipped)."""
    return bool(run.found["bank"]["n_flips"])


def demo_summary(run: Any) -> dict[str, Any]:
    """Every number the report and figures show, and the files they come from (a model with no
    flips has only its evaluation and FlipBank; the flip stages' entries are None)."""
    f, cfg, work = run.found, run.cfg, run.work
    bank = f["bank"]
    summary = {
        "settings": {**asdict(cfg), "organism": str(run.directory)},
        "organism": {
            "directory": str(run.directory),
            "hook": run.card["hook_name"],
            "n_layers": run.vlm.n_layers,
            "d_sae": int(run.sae.cfg.d_sae),
            "shortcut": run.card["shortcut"],
            "base": run.card["config"].get("base"),
            "planted_features": [x["feature"] for x in run.card["framing_features"] if x["aligned"]],
        },
        "files": {
            "questions": str(f["questions_path"]),
            "evaluation": str(f["eval_path"]),
            "flipbank": str(f["bank_path"]),
        },
        "evaluation": f["evaluation"],
        "flipbank": {k: bank[k] for k in ("n_flips", "n_controls")}
        | {"by_direction": {d: sum(c["direction"] == d for c in bank["flips"]) for d in ("yes→no", "no→yes")}},
        "paper": PAPER,
    }
    flips = dict.fromkeys(
        ("discovery", "patching", "replication", "upstream", "lens", "site", "dashboards", "clamping")
    )
    if has_flips(run):
        flips = _flip_summary(run)
        summary["files"] |= {
            "discovery": str(work / "discovery.json"),
            "patch_discovered": str(work / "patch_discovered.json"),
        }
    return {**summary, **flips, "base_text": f.get("base_text"), "feature_activation": f.get("cells")}


def _flip_summary(run: Any) -> dict[str, Any]:
    """The entries of the stages that explain flips."""
    from flipscope.experiments.discovery import records

    f, cfg, found = run.found, run.cfg, run.found["discovery"]
    return {
        "discovery": {
            "top": records(found.top(10)),
            "verdict": found.verdict,
            "found": found.found,
            "framing": found.framing,
            "patched": f["chosen"],
            "patched_by": f["chosen_by"],
            "ablation_check": found.ablation,
            "diffmean_top_features": found.diffmean["top_features"],
            "layers": found.layers,
        },
        "patching": {
            "discovered": f["patch_discovered"].summary,
            "planted": f["patch_card"].summary if "patch_card" in f else None,
            "single": f["patch_single"].summary,
            "layers": layer_recovery(f["layer_rows"], cfg.seed),
            "count": f["count"],
        },
        "replication": f["replication"],
        "upstream": f["upstream"],
        "lens": f["lens"],
        "site": _site_summary(f["site"]),
        "dashboards": {site: _dashboard_summary(d) for site, d in f["dashboards"].items()},
        "clamping": {"feature": f["clamp_feature"], "values": list(cfg.clamp_values), **f["clamping"]},
    }


def _dashboard_summary(found: dict[str, Any]) -> dict[str, Any]:
    """A site's dashboard as the report reads it: per feature, its density, how the paraphrase
    moves it, its answer alignment with the null and its measured effect on the margin (the page,
    `dashboard_<site>.html`, holds the rest)."""
    features = {f: {"density": d["density"], "shift": d["shift"]} for f, d in found["features"].items()}
    for f, d in found["features"].items():
        if "writes" in d:
            features[f]["writes"] = {k: d["writes"][k] for k in ("answer_alignment", "null")}
        for panel in ("effect", "removal"):
            if panel in d:
                features[f][panel] = d[panel]
    return {"hook": found["meta"]["hook"], "features": features}


def _site_summary(site: dict[str, Any]) -> dict[str, Any]:
    """The site the trace chose and, where it is not the main SAE's, discovery and patching there."""
    from flipscope.experiments.discovery import records

    out: dict[str, Any] = {"choice": site["choice"], "why": site.get("why"), "entry": None}
    if "discovery" in site:
        found = site["discovery"]
        out["entry"] = {
            "hook": found.hook,
            "d_sae": found.meta["sae"]["d_sae"],
            "verdict": found.verdict,
            "found": found.found,
            "framing": found.framing,
            "top": records(found.top(10)),
            "patched": site["chosen"],
            "patched_by": site["chosen_by"],
            "patching": site["patch"].summary,
            "count": site["count"],
        }
    return out
