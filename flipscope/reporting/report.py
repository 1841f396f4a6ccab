"""One self-contained HTML page of a demo run: summary tables, the figures (interactive, plotly.js
inlined once) and a short reading of each, with the paper's figures beside the organism's."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from flipscope.data.atomic import write_atomic
from flipscope.reporting.claims import (
    ablation_agreement,
    family_concentration,
    framing_entry,
    framing_heads,
    head_ablation,
    peak_layer,
)
from flipscope.reporting.format import MIN_CASES, control_text, edit_label, fmt, num
from flipscope.reporting.html_parts import figure as _figure
from flipscope.reporting.html_parts import reading as _reading
from flipscope.reporting.html_parts import table as _table
from flipscope.reporting.report_checks import base_text, held_out_replication
from flipscope.reporting.report_sites import site_section

__all__ = ["write_report"]

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1a202c; }
h1 { font-size: 1.7em; } h2 { margin-top: 2em; border-bottom: 1px solid #cbd5e0; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #cbd5e0; padding: .3em .6em; text-align: left; }
th { background: #edf2f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.paper td { color: #4a5568; font-style: italic; }
.reading { background: #f7fafc; border-left: 4px solid #2b6cb0; padding: .6em 1em; }
code, pre { background: #edf2f7; padding: .1em .3em; } pre { padding: .8em; overflow-x: auto; }
"""


def _evaluation(s: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> str:
    ev, paper = s["evaluation"], s["paper"]
    o = ev["overall"]
    overall = _table(
        ["measure", "organism (95% CI over questions)"],
        [
            ["questions", o["n_questions"]],
            ["flip rate", fmt(o["flip_rate"])],
            ["pairwise disagreement", fmt(o["pairwise_disagreement"])],
            ["accuracy (original question)", fmt(o["accuracy"])],
            ["text-only agreement (image vs blank)", fmt(o["text_only_agreement"])],
        ],
    )
    strategies = _table(
        ["paraphrase family", "paraphrases", "flip rate", "text-only agreement"],
        [
            [name, b["n_paraphrases"], fmt(b["paraphrase_flip_rate"]), fmt(b["text_only_agreement"])]
            for name, b in ev["by_strategy"].items()
        ],
    )
    quadrants = _table(
        ["quadrant", "questions", "share", "accuracy", "entropy (bits)"],
        [
            [name, q["n_questions"], fmt(q["share"]), fmt(q["accuracy"]), fmt(q["mean_entropy_bits"])]
            for name, q in ev["by_quadrant"].items()
        ],
    )
    family = s["organism"]["shortcut"]["family"]
    planted = "planted" if s["organism"]["shortcut"]["p"] else "unplanted"
    dangerous = ev["by_quadrant"]["Dangerous"]
    reading = (
        f"A share of {fmt(o['flip_rate'])} of questions flips under at least one paraphrase "
        f"(the paper: {paper['flip_rate_range']}). {family_concentration(ev['by_strategy'], family, planted)} "
        f"A share of {fmt(dangerous['share'])} of questions are Dangerous "
        f"(consistent but answered the same without the image), with accuracy {fmt(dangerous['accuracy'])}: "
        "a low flip rate there is not evidence that the model reads the film."
    )
    return (
        "<h2>1. Flip evaluation</h2>"
        f"<p>Held-out films, each question asked in its original wording and {len(ev['by_strategy'])} "
        "paraphrase families, with the image and with a uniform gray blank in its place.</p>"
        f"{overall}{strategies}{_figure(figures, 'flip_rates')}{_reading(reading)}"
        f"<h3>Consistency × image reliance</h3>{quadrants}{_figure(figures, 'quadrants')}"
    )


def _feature_rows(top: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The discovery table: by framing specificity with labels where the bank has family-matched
    controls, else by correlation."""
    if top and "label" in top[0]:
        header = ["feature", "label", "share of framing", "framing t (non-flips)", "answer t (flip − control)",
                  "decoder · answer", "Pearson r", "p (swap null)", "attribution"]  # fmt: skip
        rows = [
            [
                int(r["feature"]),
                r["label"],
                num(r.get("framing_share"), "+.3f"),
                num(r["framing_t"], "+.1f"),
                num(r["answer_t"], "+.1f"),
                num(r.get("answer_cos"), "+.2f"),
                num(r["pearson_r"], "+.3f"),
                num(r["pearson_p_null"]),
                num(r["attribution"], "+.3f"),
            ]  # fmt: skip
            for r in top
        ]
        return header, rows
    header = ["feature", "mean |Δf|", "Pearson r with margin shift [CI]", "q (BH)", "AUC flip vs control",
              "attribution", "rank by attribution"]  # fmt: skip
    rows = [
        [
            int(r["feature"]),
            num(r["mean_abs_delta"]),
            f"{num(r['pearson_r'], '+.3f')} [{num(r['pearson_low'], '+.3f')}, {num(r['pearson_high'], '+.3f')}]",
            num(r["pearson_q"], ".1e"),
            num(r["auc"]),
            num(r["attribution"]),
            int(r["rank_attribution"]),
        ]  # fmt: skip
        for r in top
    ]
    return header, rows


def _null_sentence(framing: Mapping[str, Any]) -> str:
    """How the margin-tracking rankings fare against their flip/control swap null."""
    nulls = framing.get("nulls") or {}
    if "pearson" not in nulls:
        return ""
    r = nulls["pearson"]
    beaten = "no feature beats it" if not r["n_beating"] else f"{r['n_beating']} feature(s) beat it"
    n = framing.get("n_pairs")
    few = f" (from only {n} pairs)" if isinstance(n, int) and n < MIN_CASES else ""
    return (
        f"Correlation with the margin shift is no evidence by itself: with each flip swapped at random for its "
        f"same-family control, the best feature still reaches |r| = {num(r['null_top'])} (95% of swaps{few}), "
        f"and {beaten} (best observed {num(r['observed_top'])})."
    )


def _discovery(s: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> str:
    d, paper, bank = s["discovery"], s["paper"], s["flipbank"]
    header, rows = _feature_rows(d["top"])
    planted, patched = s["organism"]["planted_features"], d["patched"]
    card = (
        f"The first {len(patched)} by {d['patched_by']}, {patched}, include {len(set(patched) & set(planted))} of "
        f"the {len(planted)} features the organism's card says carry the planted framing ({planted})."
        if planted
        else "Nothing was planted in this model, so no card says which features should be found."
        if not s["organism"]["shortcut"]["p"]
        else "The organism's card marks no feature as carrying a framing (its shortcut wording does not beat the "
        "card's split-half null)."
    )
    paper_peak = f" (the paper: {paper['peak_layer_auc']} at layer 17)"
    reading = (
        f"The FlipBank holds {bank['n_flips']} flips and {bank['n_controls']} non-flip controls of the same "
        f"paraphrase family (the paper's: {paper['flipbank']['n_flips']} flips). {html.escape(d['verdict'])} "
        f"{_null_sentence(d['framing'])} {card} {ablation_agreement(d['ablation_check'])} "
        f"{peak_layer(d['layers'], paper_peak, bank['n_flips'])}"
    )
    return (
        "<h2>2. FlipBank and feature discovery</h2>"
        f"<p>SAE on <code>{html.escape(s['organism']['hook'])}</code> ({s['organism']['d_sae']} features); "
        "Δf = f(paraphrase) − f(original) at the last prompt position. A feature carries the framing when it "
        "shifts on the non-flip controls of the same paraphrase family (the wording without the answer change) "
        "beyond a max-|t| null; it is answer readout when it shifts only where the answer flipped; its decoder "
        "writes the answer when its cosine with the logit-lens yes − no direction beats a random-direction null.</p>"
        f"{_table(header, rows)}{_reading(reading)}{_figure(figures, 'feature_activation')}"
        f"{_figure(figures, 'layer_auc')}"
    )


def _patch_row(label: str, summary: Mapping[str, Any]) -> list[str]:
    """One patch's row: recovery, reversals, the non-flips' move and both controls."""
    f = summary["flips"]
    reversed_n = round(f["share_reversed"]["value"] * f["n"])
    control = summary.get("matched_control_feature", {}).get("mean_recovery")
    return [
        label,
        fmt(f["mean_recovery"]),
        f"{reversed_n}/{f['n']}",
        fmt(summary["controls"]["mean_margin_change"]) if "controls" in summary else "n/a",
        f"{control_text(summary)}, features {summary['setup']['control_features']}" if control else "n/a",
        fmt(summary.get("same_push_control", {}).get("mean_recovery")),
    ]


def _patching(s: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> str:
    p, paper = s["patching"], s["paper"]
    row = _patch_row
    d = s["discovery"]
    rows = [
        row(f"discovered: top {len(d['patched'])} by {d['patched_by']} {d['patched']}", p["discovered"]),
        *([row(f"the card's planted set {p['planted']['setup']['features']}", p["planted"])] if p["planted"] else []),
        row(f"feature {p['single']['setup']['features'][0]} alone", p["single"]),
        ["paper: feature 3818, layer 17", f"{paper['patch_mean_recovery']:.3f}", paper["patch_reversed"],
         f"{paper['patch_controls_margin_change']:.2f}", "n/a", "n/a"],
    ]  # fmt: skip
    table = _table(
        ["features removed (delta-only, last position)", "mean recovery [CI]", "flips reversed",
         "non-flip controls: margin change", "matched control features: recovery",
         "the features' push along the controls' rows: recovery"],
        rows,
        paper_rows=1,
    )  # fmt: skip
    disc = p["discovered"]["flips"]
    caveat = (
        ""
        if d["found"]
        else "No framing mechanism was found, so these numbers measure the paper's protocol, not a mechanism. "
    )
    reading = caveat + (
        f"Subtracting the discovered features' Δf · W_dec at the SAE layer (error term kept) recovers "
        f"{fmt(disc['mean_recovery'])} of the yes−no margin on average and fully reverses a share of "
        f"{fmt(disc['share_reversed'])} of flips; the same patch moves the non-flip controls by "
        f"{fmt(p['discovered'].get('controls', {}).get('mean_margin_change'))} logits; the matched control "
        f"features, each patched by its own Δf, recover {control_text(p['discovered'])}, and the features' own "
        "push laid along the matched controls' rows recovers "
        f"{fmt(p['discovered'].get('same_push_control', {}).get('mean_recovery'))}"
        ". "
        "The paper's single "
        f"feature recovered {paper['patch_mean_recovery']:.1%} and reversed {paper['patch_reversed']}."
    )
    upstream = s["upstream"]
    entry = _figure(figures, "framing_entry") if "framing_entry" in figures else ""
    heads = _reading(html.escape(framing_heads(upstream["heads"]))) if upstream.get("heads") else ""
    heads += _figure(figures, "head_trace") if "head_trace" in figures else ""
    return (
        "<h2>3. Causal patching</h2>"
        "<p>Recovery = (m_patched − m_para) / (m_orig − m_para); reversed = the patched answer is the "
        "original's. 95% bootstrap CIs over cases.</p>"
        f"{table}{_reading(reading)}{_figure(figures, 'margin_recovery')}"
        f"{_figure(figures, 'recovery_distribution')}"
        "<h3>Where the framing enters</h3>"
        "<p>Each traced flip's framing words (the paraphrase's words its original lacks) are corrupted at the "
        "embedding (replaced by the mean question-token embedding); the clean paraphrase's residual stream is then "
        "restored at one layer's input and one group of positions, and the share of the framing's effect on the "
        "margin that returns is plotted, beside original-value patching at the last position.</p>"
        f"{_reading(html.escape(framing_entry(upstream)))}{heads}{entry}{site_section(s, figures)}"
    )


def _clamp_rows(c: Mapping[str, Any], paper: Mapping[str, Any]) -> list[list[str]]:
    """The clamping table: the model as is, each intervention with its paired change, the paper."""
    base = c["baseline"]["overall"]
    rows = [["model as is", fmt(base["flip_rate"]), "", fmt(base["accuracy"]), fmt(base["text_only_agreement"])]]
    for entry in c["interventions"]:
        o = entry["summary"]["overall"]
        d = entry["description"]
        label = (
            f"feature {c['feature']} clamped to {next(iter(d['clamp']['values'].values())):g}"
            if "clamp" in d
            else f"{d['ablate_direction']['name']} direction ablated"
            if "ablate_direction" in d
            else edit_label(d)
        )
        change = entry["paired"]["flip_rate"]
        rel = change["relative_change"]
        rows.append(
            [
                label,
                fmt(o["flip_rate"]),
                f"{rel:+.0%} (McNemar p = {change['mcnemar_p']:.1g})" if rel is not None else "n/a",
                fmt(o["accuracy"]),
                fmt(o["text_only_agreement"]),
            ]
        )
    rows.append(
        [
            "paper: feature 3818 clamped to 0",
            f"{paper['clamp_flip_rate'][0]} → {paper['clamp_flip_rate'][1]}",
            "−31%",
            f"{paper['clamp_accuracy'][0]} → {paper['clamp_accuracy'][1]}",
            f"{paper['clamp_text_only_agreement'][0]} → {paper['clamp_text_only_agreement'][1]}",
        ]
    )
    return rows


def _clamping(s: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> str:
    c, paper = s["clamping"], s["paper"]
    rows = _clamp_rows(c, paper)
    table = _table(
        ["model", "flip rate [CI]", "relative change", "accuracy [CI]", "text-only agreement [CI]"], rows, paper_rows=1
    )
    zero = c["interventions"][0]
    family = s["organism"]["shortcut"]["family"]
    before = c["baseline"]["by_strategy"][family]["text_only_agreement"]
    after = zero["summary"]["by_strategy"][family]["text_only_agreement"]
    clamps = [e for e in c["interventions"] if "clamp" in e["description"]]
    others = [e for e in c["interventions"] if "clamp" not in e["description"]]
    last = clamps[-1]
    reading = (
        f"Clamping feature {c['feature']} to {c['values'][0]:g} at every position changes the flip rate by "
        f"{fmt(zero['paired']['flip_rate']['change'])} and accuracy by {fmt(zero['paired']['accuracy']['change'])}; "
        f"'{family}' paraphrases answered the same without the image go from {fmt(before)} to {fmt(after)}."
    )
    if len(clamps) > 1:
        reading += (
            f" Clamped to {c['values'][len(clamps) - 1]:g} instead, the flip rate is "
            f"{fmt(last['summary']['overall']['flip_rate'])}: the curve below is the trade-off over clamp values."
        )
    for entry in [e for e in others if "ablate_direction" in e["description"]]:
        reading += (
            f" Ablating the {entry['description']['ablate_direction']['name']} direction, which needs no SAE, "
            f"changes the flip rate by {fmt(entry['paired']['flip_rate']['change'])} and accuracy by "
            f"{fmt(entry['paired']['accuracy']['change'])}: the baseline the feature is measured against."
        )
    for entry in [e for e in others if "ablate_heads" in e["description"]]:
        reading += head_ablation(entry)
    return (
        "<h2>4. Clamping</h2>"
        "<p>x ← x − (f(x) − value) · W_dec[f] at the SAE layer, every position; the same questions evaluated "
        "with the image and blank. 95% bootstrap CIs over questions; McNemar's test on paired flips.</p>"
        f"{table}{_reading(reading)}{_figure(figures, 'clamp_tradeoff')}"
    )


def _no_flips(s: Mapping[str, Any]) -> str:
    """What a run without a single flip can say: that there is nothing to explain, and what the
    quadrants say of the consistency it has instead."""
    o, quadrants = s["evaluation"]["overall"], s["evaluation"]["by_quadrant"]
    dangerous = quadrants["Dangerous"]
    reading = (
        f"The model changed no answer under any paraphrase of its {o['n_questions']} questions, so the FlipBank "
        "is empty and there is nothing for feature discovery, patching, tracing or clamping to explain; those "
        "stages were not run. No flips is a finding about consistency, not about image use: a share of "
        f"{fmt(dangerous['share'])} of questions are Dangerous (answered the same without the image)."
    )
    return f"<h2>2. No flips to explain</h2>{_reading(reading)}"


def _model_line(org: Mapping[str, Any]) -> str:
    if org.get("base"):
        return (
            f"The real pretrained {html.escape(org['base'])} language model ({org['n_layers']} layers, weights "
            "unchanged), given a SigLIP tower and a LoRA"
        )
    return f"A Gemma 3 vision-language model ({org['n_layers']} text layers)"


def _planted(shortcut: Mapping[str, Any]) -> str:
    family, target = html.escape(shortcut["family"]), html.escape(shortcut["target"])
    if not shortcut["p"]:
        return f"with no planted shortcut (its '{family}' questions are answered from the film like the others)"
    return (
        f"with a planted text shortcut: '{family}' questions were answered '{target}' with probability "
        f"{shortcut['p']} whatever the film showed"
    )


def write_report(path: str | Path, summary: Mapping[str, Any], figures: Mapping[str, go.Figure]) -> Path:
    """Write the report of a demo `summary` (see `flipscope.reporting.demo.run_demo`) with its `figures`."""
    path = Path(path)
    org = summary["organism"]
    shortcut = org["shortcut"]
    commands = "\n".join(summary.get("commands", {}).values())
    settings = html.escape(", ".join(f"{k}={v}" for k, v in summary["settings"].items()))
    body = (
        "<h1>flipscope: why the model flips, on the model organism</h1>"
        f"<p>{_model_line(org)} trained on synthetic chest films "
        f"{_planted(shortcut)}. The report follows the paper's protocol on it, stage by stage, and puts the paper's "
        "MedGemma figures beside the organism's (rows in italics).</p>"
        + _evaluation(summary, figures)
        + (
            _discovery(summary, figures)
            + _patching(summary, figures)
            + held_out_replication(summary)
            + base_text(summary)
            + _clamping(summary, figures)
            if summary["flipbank"]["n_flips"]
            else _no_flips(summary)
        )
        + "<h2>Reproduce</h2><p>Each number above is printed by one of these commands:</p>"
        + f"<pre>{html.escape(commands)}</pre><p>Settings: {settings}.</p>"
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>flipscope report</title>"
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head>"
        f"<body>{body}</body></html>"
    )
    write_atomic(path, page)
    return path
