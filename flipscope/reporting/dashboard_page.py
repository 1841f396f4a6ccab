"""The feature dashboard in words and on a page (`feature_dashboard` results in): per feature, where
it fires and how the wording moves it at the answer position, each comparison said only where its
interval says so; its segment means, its top activations in context, its tokens, and flips shaded
token by token."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_atomic
from flipscope.reporting.feature_claims import feature_sentence
from flipscope.reporting.format import fmt, num
from flipscope.reporting.html_parts import reading, table
from flipscope.reporting.report import STYLE

__all__ = ["write_dashboard_page"]

PLACES = {"image": "the image block", "before question": "the chat header", "question": "the question's tokens",
          "tail": "the template's tail after the question"}  # fmt: skip
SHADE = (49, 130, 206)


def _segment_rows(seg: Mapping[str, Any]) -> list[list[str]]:
    groups = ("originals", "paraphrases", "flips' paraphrases")
    rows = [[PLACES.get(s, s)] + [num(seg[g][s]["mean"], ".2f") for g in groups] for s in (*PLACES, "last position")]
    return rows + [["prompts"] + [str(seg[g]["n_prompts"]) for g in groups]]


def _shade(tokens: list[list[Any]], scale: float) -> str:
    """Tokens as spans shaded by activation (darkest at `scale`), each with its value on hover."""
    spans = []
    for token, value in tokens:
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, value / scale))
        r, g, b = SHADE
        spans.append(f'<span title="{value:.2f}" style="background: rgba({r},{g},{b},{alpha:.2f}); '
                     f'padding: 0 1px; margin-right: 1px">{html.escape(token)}</span>')  # fmt: skip
    return "<code>" + "".join(spans) + "</code>"


def _top_table(rows: list[Mapping[str, Any]]) -> str:
    head = "<tr><th>activation</th><th>token in context</th><th>where</th><th>wording</th></tr>"
    body = "".join(
        f'<tr><td class="num">{r["activation"]:.2f}</td><td><code>{html.escape(r["before"])}<mark>'
        f"{html.escape(r['token'])}</mark>{html.escape(r['after'])}</code></td>"
        f"<td>{'last position' if r['last'] else html.escape(r['segment'])}</td>"
        f"<td>{html.escape(r['strategy'])}: {html.escape(r['wording'])}</td></tr>"
        for r in rows
    )
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _section(feature: str, found: Mapping[str, Any]) -> str:
    examples = found["examples"]
    scale = max((v for e in examples for w in ("original", "paraphrase") for _, v in e[w]), default=0.0)
    strips = "".join(
        f"<p>{html.escape(e['case'])}<br>original: {_shade(e['original'], scale)}<br>"
        f"paraphrase: {_shade(e['paraphrase'], scale)}</p>"
        for e in examples
    )
    last = [[name, num(v["mean"], ".2f"), str(v["n"])] for name, v in found["last"].items()]
    tokens = [[repr(t["token"]), t["n_active"], num(t["mean_activation"], ".2f")] for t in found["tokens"]]
    return (
        f"<h2>Feature {html.escape(feature)}</h2>"
        + reading(html.escape(feature_sentence(feature, found)))
        + table(["mean activation per token", "originals", "paraphrases", "flips' paraphrases"],
                _segment_rows(found["segments"]))  # fmt: skip
        + table(["at the last position, by wording", "mean", "prompts"], last)
        + "<h3>Largest on the question and the tail</h3>" + _top_table(found["top"])
        + table(["token", "times active", "mean when active"], tokens)
        + ("<h3>Flips whose paraphrase reads it most at the last position</h3>" + strips if strips else "")
        + (_writes_table(found["writes"]) if "writes" in found else "")
        + (_effect_table(found["effect"]) if "effect" in found else "")
        + (_removal_table(found["removal"]) if "removal" in found else "")
    )  # fmt: skip


def _writes_table(writes: Mapping[str, Any]) -> str:
    """The tokens the decoder row raises and lowers most on the direct path, side by side."""
    rows = [[repr(up[0]), num(up[1], ".3f"), repr(down[0]), num(down[1], ".3f")]
            for up, down in zip(writes["raises"], writes["lowers"], strict=True)]  # fmt: skip
    return (
        "<h3>What its decoder row writes, read directly through the unembedding</h3><p>Per unit of activation, "
        "before the final norm's 1/rms; the layers after the SAE's hook are ignored.</p>"
        + table(["raises", "logit", "lowers", "logit"], rows)
    )


def _effect_table(effect: Mapping[str, Any]) -> str:
    """The margin's move when the decoder row is written at the answer position, beside the null."""
    est = effect["effect"]
    row = [num(effect["scale"], ".2f"), fmt(est), num(effect["per_unit"], ".3f"), num(effect["null"], ".3f"),
           "yes" if effect["moves"] else "no"]  # fmt: skip
    return (
        "<h3>What writing it at the answer position does</h3><p>Its decoder row times its peak activation added at "
        "the SAE's hook at the last prompt position, and once subtracted; half the difference of the two margins, "
        f"over {est['n'] if est else 0} prompts, beside {effect['n_random']} random directions of the same norm.</p>"
        + table(["peak activation", "margin's move", "per unit", "random directions' largest", "beyond them"], [row])
    )


def _removal_table(removal: Mapping[str, Any]) -> str:
    """The margin's move when the feature is switched off where the wordings differ, beside the null."""
    est = removal["effect"]
    row = [fmt(est), num(removal["null"], ".3f"), "yes" if removal["moves"] else "no"]
    return (
        "<h3>What switching it off does</h3><p>The feature removed on the question's tokens and the template's tail "
        "(x − f(x)·row, the SAE's error term kept), the margin's move against the same prompts as they are, beside "
        f"{removal['n_random']} random directions of its row's norm removed in the same amounts.</p>"
        + table(["margin's move", "random directions' largest", "beyond them"], [row])
    )


def write_dashboard_page(path: str | Path, found: Mapping[str, Any], source: str) -> Path:
    """Write the self-contained dashboard page for `found` (`feature_dashboard`'s result)."""
    meta = found["meta"]
    body = (
        f"<h1>flipscope: where the features fire</h1><p>{html.escape(source)}: SAE at {html.escape(meta['hook'])}, "
        f"{meta['n_prompts']} distinct prompts of {meta['n_flips']} flips and {meta['n_controls']} controls. "
        "Where a feature fires is not yet what it does: patching says that.</p>"
        + "".join(_section(f, v) for f, v in found["features"].items())
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>flipscope features</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return write_atomic(path, page)
