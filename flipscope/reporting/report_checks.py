"""The report's validity checks for a model where nobody planted the answer: held-out
replication of the patch, and the same analysis on the base language model alone."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from flipscope.reporting.claims import replication
from flipscope.reporting.format import control_text, fmt, num
from flipscope.reporting.html_parts import reading, table

__all__ = ["base_text", "held_out_replication"]


def held_out_replication(s: Mapping[str, Any]) -> str:
    """Features chosen on one half of the FlipBank, patched on the other, with both controls."""
    if not s["replication"]:
        return "<h3>Held-out replication</h3>" + reading(
            f"The FlipBank's {s['flipbank']['n_flips']} flips cannot be split by question into two halves of at "
            "least 3 flips each, so the patch was not replicated on held-out flips."
        )
    rows = [
        [
            r["direction"],
            f"{r['features']} ({r['chosen_by']})",
            f"{r['discovery_flips']} / {r['held_out_flips']}",
            fmt(r["patch"]["flips"]["mean_recovery"]),
            control_text(r["patch"]),
            fmt(r["patch"].get("controls", {}).get("mean_margin_change")),
        ]
        for r in s["replication"]
    ]
    grid = table(
        ["halves", "features chosen on the first", "flips (discovery / held out)", "held-out recovery [CI]",
         "matched control features", "held-out non-flips: margin change"],
        rows,
    )  # fmt: skip
    return (
        "<h3>Held-out replication</h3><p>The FlipBank split by question into two halves; features chosen on one "
        "half as above, patched on the other, with both controls.</p>"
        f"{grid}{reading(html.escape(replication(s['replication'])))}"
    )


def base_text(s: Mapping[str, Any]) -> str:
    """The base model's text-only flips (reports as evidence), analysed as the organism's."""
    b = s.get("base_text")
    if not b:
        return ""
    o = b["evaluation"]["overall"]
    bank = b["flipbank"]
    head = (
        f"<h2>The base model alone, reading reports</h2><p>{html.escape(b['model'])}: the same films as one-sentence "
        "reports, the same wordings, no vision and no fine-tuning. Its flips come from pretraining only.</p>"
        + table(
            ["flip rate", "accuracy", "FlipBank flips (yes→no / no→yes)", "controls"],
            [[fmt(o["flip_rate"]), fmt(o["accuracy"]),
              f"{bank['n_flips']} ({bank['by_direction']['yes→no']} / {bank['by_direction']['no→yes']})",
              bank["n_controls"]]],
        )
    )  # fmt: skip
    if b["patch"] is None:
        return head + reading(
            f"The base model's flips pass the curation rules on too few questions ({bank['n_flips']} flips) for "
            "discovery and held-out patching; nothing is claimed about its mechanism."
        )
    d, p = b["discovery"], b["patch"]
    text = (
        f"{d['verdict']} Removing features {d['features']} (by {d['chosen_by']}) recovers "
        f"{fmt(p['flips']['mean_recovery'])} of the margin on its flips (matched control features "
        f"{control_text(p)}; non-flips move "
        f"{fmt(p.get('controls', {}).get('mean_margin_change'))}). The organism's SAE was trained on the "
        f"fine-tuned model; on the base model's activations at these prompts its FVU is {num(b['sae_fvu'], '.2f')}"
        f"{' (it does not describe them, so these features say little)' if b['sae_fvu'] > 0.5 else ''}. "
    )
    text += replication(b["replication"] or [])
    return head + reading(html.escape(text))
