"""Sentences about a mechanism, each chosen by a test on the numbers rather than a template.

A claim is printed only when its evidence holds: flips "concentrate" in a paraphrase family only
when that family's flip-rate interval lies above every other family's and rests on at least
`MIN_CASES` paraphrases; a peak is named only among finite values; an agreement is quoted only
when it was computed. Otherwise the sentence says what the numbers do not show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from flipscope.reporting.format import MIN_CASES, fmt

__all__ = [
    "wording_bound_reading",
    "lens_reading",
    "site_comparison",
    "ablation_agreement",
    "family_concentration",
    "framing_entry",
    "framing_heads",
    "head_ablation",
    "peak_layer",
    "beats_control",
    "replicated",
    "replication",
]


def family_concentration(by_strategy: Mapping[str, Mapping[str, Any]], family: str, what: str = "") -> str:
    """Whether flips concentrate in `family` (the planted or suspected shortcut): its paraphrase
    flip-rate CI above every other family's, on at least `MIN_CASES` paraphrases."""
    rate = by_strategy.get(family, {}).get("paraphrase_flip_rate")
    others = {name: b["paraphrase_flip_rate"] for name, b in by_strategy.items() if name != family}
    if not rate or not rate.get("n"):
        return f"No '{family}' paraphrases were evaluated, so nothing can be said about that family."
    if rate["n"] < MIN_CASES:
        return f"'{family}' paraphrases flip {fmt(rate)}: too few to compare with the other families."
    highest = max((o["high"] for o in others.values() if o.get("n")), default=0.0)
    if rate["low"] > highest:
        return (
            f"The flips concentrate in the {what + ' ' if what else ''}'{family}' family: its paraphrases flip "
            f"{fmt(rate)} of the "
            f"time, and its interval lies above every other family's (whose upper bounds reach at most "
            f"{highest:.3f})."
        )
    return (
        f"Flips do not concentrate in the '{family}' family: its paraphrases flip {fmt(rate)}, an interval that "
        f"overlaps another family's (upper bounds up to {highest:.3f})."
    )


def _only(n: Any, what: str) -> str:
    return f" (from only {n} {what})" if isinstance(n, int) and n < MIN_CASES else ""


def peak_layer(layers: Sequence[Mapping[str, Any]], reference: str = "", n_flips: int | None = None) -> str:
    """Where the flip-vs-control AUC peaks, among the layers where it is a finite number (flagged
    when it rests on fewer than `MIN_CASES` flips)."""
    finite = [r for r in layers if isinstance(r.get("auc"), int | float) and math.isfinite(r["auc"])]
    if not finite:
        return "The flip-vs-control AUC could not be computed at any layer (too few flips or controls)."
    peak = max(finite, key=lambda r: r["auc"])
    return f"The flip-vs-control AUC peaks at {peak['auc']:.2f} at {peak['hook']}{_only(n_flips, 'flips')}{reference}."


def ablation_agreement(check: Mapping[str, Any] | None) -> str:
    """How well attribution agreed with exact single-feature ablation, when that was computed."""
    value = (check or {}).get("spearman")
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "Attribution was not checked against exact ablation in this run."
    flag = _only((check or {}).get("n_cases"), "flip cases")
    return f"Attribution agrees with exact single-feature ablation (Spearman {value:.3f} over features{flag})."


def framing_entry(upstream: Mapping[str, Any]) -> str:
    """Where the framing enters (`UpstreamTrace.summary()`): what corrupting the framing words
    undoes, the words that undo most alone, and the first layer whose last position carries at
    least half of the effect."""
    if not upstream.get("n_cases"):
        return "No flip could be traced: none had framing words whose corruption moved its margin."
    words = list(upstream["words"].items())[:2]
    named = " and ".join(f"'{w}' ({fmt(e)})" for w, e in words)
    first = upstream["profile"][0]
    text = (
        f"Corrupting the framing words (the paraphrase's words its original lacks) undoes "
        f"{fmt(upstream['corrupted_share'])} of the flips' margin shift; alone, {named} undo most. "
        f"Restoring the clean run at those words restores {fmt(first['framing words'])} of the effect at layer "
        f"{first['layer']}'s input"
    )
    entry = upstream.get("entry_layer")
    if not upstream.get("explained", True):
        return text + (
            ". The framing words do not explain the shift (the CI's lower end is below half), so the tracing "
            "cannot say where it enters."
        )
    if entry is None:
        return text + ", and at no traced layer does the last position alone carry half of it (by its CI's lower end)."
    row = next(r for r in upstream["profile"] if r["layer"] == entry)
    if entry == first["layer"]:
        return text + f"; the last position alone already carries {fmt(row['last position'])} there."
    layers = [r["layer"] for r in upstream["profile"]]
    before = layers[layers.index(entry) - 1]
    within = f"layer {before}" if entry - before == 1 else f"layers {before}–{entry - 1}"
    return text + (
        f"; from layer {entry}'s input on, the last position alone carries {fmt(row['last position'])}: the "
        f"framing reaches the answer position in {within}."
    )


def framing_heads(heads: Mapping[str, Any]) -> str:
    """Which heads move the framing to the answer position (`HeadTrace.summary()`): the heads
    both enough and needed, else the layer whose attention carries it spread over heads, else none."""
    n = heads.get("n_cases")
    if not n:
        return "No flip could be traced head by head: none had framing words whose corruption moved its margin."
    if not heads.get("explained"):
        return (
            "The framing words do not explain the flips' shift (the CI's lower end is below half), so no head is named."
        )
    flag, bar = _only(n, "flips"), heads["bar"]
    found = heads.get("carriers") or []
    if found:
        names = " and ".join(f"{c['layer']}.{c['head']}" for c in found)
        shares = "; ".join(
            ("" if len(found) == 1 else f"{c['layer']}.{c['head']}: ")
            + f"restoring it alone brings back {fmt(c['restored'])} of the framing's effect, and corrupting it "
            f"alone takes away {fmt(c['removed'])}"
            for c in found
        )
        verb = "carries" if len(found) == 1 else "carry"
        looks = "".join(_carrier_looks(c, heads) for c in found)
        return (
            f"Head{'s' if len(found) > 1 else ''} {names} {verb} the framing to the answer position: {shares}{flag}."
            + looks
        )
    everyone = [(row, h) for row in heads["layers"] for h in row["heads"]]
    row, best = max(everyone, key=lambda rh: rh[1]["restored"]["value"])
    spread = [r for r in heads["layers"] if r["all heads"] and r["all heads"]["low"] >= bar]
    where = f"head {row['layer']}.{best['head']} brings back {fmt(best['restored'])} alone"
    if best["restored"]["low"] >= bar:
        return (
            f"No head both brings back and takes away half of the framing's effect at the answer position: {where}, "
            f"but corrupting it alone takes away only {fmt(best['removed'])}, so other heads carry it too{flag}."
        )
    if spread:
        layer = spread[0]
        return (
            f"Layer {layer['layer']}'s attention brings back {fmt(layer['all heads'])} of the framing's effect at the "
            f"answer position, spread over its heads: no head alone brings back half ({where}){flag}."
        )
    return (
        "No traced layer's attention at the answer position brings back half of the framing's effect: it reaches "
        f"that position through other positions or the layers not traced ({where}){flag}."
    )


def _carrier_looks(carrier: Mapping[str, Any], heads: Mapping[str, Any]) -> str:
    """Where a carrier head looks from the answer position (`HeadTrace.summary()`'s `looks`): its
    attention on the framing words; whether that is more than any other traced head's (CIs apart);
    and whether, of what it gives the question, the framing words get more than their share of its
    tokens (the paired difference's CI)."""
    looks = carrier.get("looks")
    if not looks or looks.get("favours") is None:
        return ""
    name, on = f"{carrier['layer']}.{carrier['head']}", looks["framing words"]
    others = [
        (f"{row['layer']}.{h['head']}", h["looks"]["framing words"])
        for row in heads["layers"]
        for h in row["heads"]
        if (row["layer"], h["head"]) != (carrier["layer"], carrier["head"])
    ]
    text = f" From the answer position head {name} puts {fmt(on)} of its attention on the framing words"
    if others:
        runner, best = max(others, key=lambda o: o[1]["value"])
        if on["low"] > max(o[1]["high"] for o in others):
            text += f", more than any other traced head (next: head {runner}, {fmt(best)})"
    favours, share = looks["favours"], heads["word_share"]
    compared = (
        f"{fmt(looks['of the question'])} of what it gives the question, whose tokens are {fmt(share)} framing words"
    )
    if favours["low"] > 0:
        return text + f"; {compared}: it favours them beyond their share ({fmt(favours)})."
    if favours["high"] < 0:
        return text + f"; {compared}: it gives them less than their share ({fmt(favours)})."
    return text + f"; {compared}: in proportion to their share."


def head_ablation(entry: Mapping[str, Any]) -> str:
    """What switching off a head the trace names does (an `ablate_heads` entry of a clamping
    comparison): the paired changes in flip rate and accuracy, and whether that is a cure, a
    costly one, or none, by their CIs."""
    d = entry["description"]["ablate_heads"]
    names = ", ".join(f"{d['layer']}.{h}" for h in d["heads"])
    flips, accuracy = entry["paired"]["flip_rate"]["change"], entry["paired"]["accuracy"]["change"]
    one = len(d["heads"]) == 1
    its, carries = ("its output", "carries") if one else ("each one's output", "carry")
    how = f"{its} replaced by its mean over the questions" if d["by"] == "mean" else f"{its} zeroed"
    text = (
        f" Switching off head{'' if one else 's'} {names} ({how}), which the trace says {carries} the framing to the "
        f"answer position, changes the flip rate by {fmt(flips)} and accuracy by {fmt(accuracy)}"
    )
    subject = "the head is" if one else "the heads are"
    if flips["high"] >= 0:
        return text + f": the flips do not fall beyond chance, so {subject} not what they need at run time."
    if accuracy["high"] < 0:
        what = (
            "the head carries more than the framing and is" if one else "the heads carry more than the framing and are"
        )
        return text + f": it removes flips but costs accuracy, so {what} no cure."
    return text + ": it removes flips at no accuracy cost these questions can detect."


def replicated(run: Mapping[str, Any]) -> bool:
    """Whether features chosen on one half recover margin on the other: the held-out recovery's
    interval above 0, on at least `MIN_CASES` flips."""
    flips = run["patch"]["flips"]
    rec = flips["mean_recovery"]
    if flips["n"] < MIN_CASES or not all(
        isinstance(rec[k], int | float) and math.isfinite(rec[k]) for k in ("low", "high")
    ):
        return False
    return rec["low"] > 0


def beats_control(run: Mapping[str, Any]) -> bool | None:
    """Whether the held-out recovery's interval lies above the matched control features' and, where
    it was measured, above the same push laid along the matched controls' rows (None when no control was patched)."""
    rec = run["patch"]["flips"]["mean_recovery"]
    controls = [run["patch"].get(k, {}).get("mean_recovery") for k in ("matched_control_feature", "same_push_control")]
    controls = [c for c in controls if c and c.get("n")]
    if not controls:
        return None
    return all(rec["low"] > c["high"] for c in controls)


def _control_clause(run: Mapping[str, Any]) -> str:
    patch = run["patch"]
    control = patch.get("matched_control_feature", {}).get("mean_recovery")
    push = patch.get("same_push_control", {}).get("mean_recovery")
    ratio = patch.get("setup", {}).get("control_size_ratio")
    beats = beats_control(run)
    if beats is None:
        why = patch.get("setup", {}).get("no_control")
        return (
            f"no matched control feature could be patched ({why})" if why else "no matched control feature was patched"
        )
    size = f"; their own push is {ratio:.2f}× the features'" if ratio is not None else ""
    pushed = f", and the features' push laid along the matched controls' rows recovers {fmt(push)}" if push else ""
    if beats:
        return (
            f"the matched control features recover less ({fmt(control)}{size}){pushed}, so the recovery is "
            "specific to them"
        )
    return (
        f"the matched control features recover {fmt(control)}{size}{pushed}: not less, so the recovery is not shown "
        "to be specific to these features"
    )


def replication(runs: Sequence[Mapping[str, Any]]) -> str:
    """What held-out replication shows, run by run (`flipscope.experiments.replication.replicate`)."""
    if not runs:
        return "Too few flips to split into a discovery half and a held-out half."
    parts = []
    for run in runs:
        patch = run["patch"]
        n = patch["flips"]["n"]
        verdict = "replicates" if replicated(run) else "does not replicate"
        why = f" (only {n} held-out flips)" if n < MIN_CASES else ""
        parts.append(
            f"Chosen on half {run['direction'][0]} by {run['chosen_by']} ({run['features']}), the features recover "
            f"{fmt(patch['flips']['mean_recovery'])} of the margin on the {n} held-out flips of half "
            f"{run['direction'][-1]}: the patch {verdict}{why}; {_control_clause(run)}; held-out non-flips move "
            f"{fmt(patch.get('controls', {}).get('mean_margin_change'))} logits."
        )
    held = sum(replicated(r) for r in runs)
    lead = (
        "The patch replicates on held-out flips in both directions. "
        if held == len(runs)
        else f"The patch replicates on held-out flips in {held} of {len(runs)} directions. "
    )
    return lead + " ".join(parts)


def site_comparison(site: Mapping[str, Any] | None, discovery: Mapping[str, Any], patching: Mapping[str, Any]) -> str:
    """Where the framing is a feature and where it has become the answer: the framing features'
    recovery at the site the trace chose beside the main SAE's, a difference claimed only when
    the two CIs do not overlap and the entry site's features carry the wording beyond the null."""
    if not site or site.get("choice") is None:
        why = (site or {}).get("why", "the trace was not run")
        return f"No SAE site was chosen from the trace: {why}"
    chosen = site["choice"]["chosen"]["hook"]
    entry = site.get("entry")
    if entry is None:
        return f"The organism's SAE already sits where the trace places the framing's entry ({chosen})."
    main_hook = patching["discovered"]["setup"]["hook"]
    e, m = entry["patching"]["flips"]["mean_recovery"], patching["discovered"]["flips"]["mean_recovery"]
    pair = f"{fmt(e)} at {chosen} against {fmt(m)} at {main_hook}"
    if not entry["found"]:
        return (
            f"No framing mechanism was found at {chosen} either, where the trace places the framing's entry; the "
            f"features patched there ({entry['patched_by']}) recover {pair}."
        )
    if e["low"] > m["high"]:
        return (
            f"At {chosen} the framing is still a feature: the {len(entry['patched'])} features that carry the wording "
            f"there recover {pair}, where the same wording has already become the answer and removing features takes "
            "back less of it."
        )
    if e["high"] < m["low"]:
        return (
            f"The features at {main_hook} recover more than those at {chosen}, where the trace places the framing's "
            f"entry ({pair}): the framing is not more of a feature at its entry here."
        )
    return f"The two sites' features recover about as much ({pair}): the site does not change the reading here."


def lens_reading(lens: Mapping[str, Any] | None) -> str:
    """What the logit lens shows (`LensTrajectory.summary()`): the first layer where flips diverge
    from their originals beyond the same-family non-flips (ratio CI above 1), and where they commit."""
    if not lens or not lens.get("layers"):
        return "The logit lens was not read."
    if not lens["n_controls"]:
        return "The logit lens has no same-family non-flips to compare the flips with."
    n = lens["n_flips"]
    if n < 2 or lens["n_controls"] < 2:
        return (
            f"The logit lens cannot compare {n} flip(s) with {lens['n_controls']} same-family non-flip(s): a ratio's "
            "interval needs at least two of each."
        )
    lead = f"From only {n} flips, under the logit lens the" if n < MIN_CASES else "Under the logit lens the"
    first = lens["first_divergent_layer"]
    commit = lens["commit_layer"]
    committed = (
        f"; the median flip's paraphrase gives its final answer from layer {commit['median']:g} on"
        if commit["median"] is not None
        else ""
    )
    if first is None:
        return (
            f"{lead} {n} flips diverge from their originals no more than the "
            f"same-family non-flips at any layer (no ratio's CI lies above 1){committed}."
        )
    row = next(r for r in lens["layers"] if r["layer"] == first)
    return (
        f"{lead} flips diverge from their originals more than the same-family non-flips from "
        f"layer {first} on (ratio {fmt(row['ratio'])} there){committed}. {_selection_reading(lens, row)}"
    )


def _selection_reading(lens: Mapping[str, Any], first: Mapping[str, Any]) -> str:
    """Whether the flips' excess divergence is more than choosing them for crossing zero gives."""
    if not first.get("selection"):
        return "Flips are chosen for crossing zero, so some excess is expected of any model."
    beyond = lens.get("first_layer_beyond_selection")
    if beyond is None:
        return (
            "Selection alone gives as much: shuffling the shifts among cases of the same wording and taking as flips "
            f"those that cross zero gives a ratio of {first['selection']['ratio']:.2f} at layer {first['layer']}, and "
            "no layer's observed ratio lies beyond such shuffles (p ≥ 0.05)."
        )
    row = next(r for r in lens["layers"] if r["layer"] == beyond)
    return (
        f"That is more than choosing flips for crossing zero gives: shuffling the shifts among cases of the same "
        f"wording gives a ratio of {row['selection']['ratio']:.2f} at layer {beyond}, and the flips' exceeds it from "
        f"layer {beyond} on (p = {row['selection']['p_value']:.3f}, {row['selection']['n_shuffles']} shuffles)."
    )


def wording_bound_reading(bound: Mapping[str, Any] | None, where: str = "") -> str:
    """Whether a patch (at `where`, if named) moves the same-family non-flips further than their own
    framing words do (`flipscope.experiments.control_bound`), by the paired difference's verdict."""
    if not bound:
        return "No non-flip has framing words of its own, so the patch's effect on them has no bound to meet."
    patch, own, diff = (fmt(bound[k]) for k in ("patch", "wording", "difference"))
    at = f" at {where}" if where else ""
    head = f"The non-flips move by {patch} under the patch{at}, and by {own} when their own framing words are corrupted"
    if bound["verdict"] == "within":
        return f"{head}: within the framing's own effect on them (paired difference {diff})."
    if bound["verdict"] == "as much":
        return (
            f"{head}: about as much (paired difference {diff}, its interval reaching 0), so no more than the "
            "framing's own effect that these cases can tell."
        )
    return (
        f"{head}: more (paired difference {diff}), so the patch does more than take the framing out of the non-flips."
    )
