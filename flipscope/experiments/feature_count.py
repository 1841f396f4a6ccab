"""How many features undo the flips: the first k of a ranking removed together, k = 1..K.

Where the framing is a handful of features (the shipped organism at `blocks.0.hook_attn_out`)
the recovery of the yes−no margin saturates within a few; where it is spread over many, or has
become the answer readout (the same organism at `blocks.2.hook_resid_post`), no small count
recovers it. `count_sweep` (`flipscope.experiments.sweeps`) runs every count on every case into a
resumable store; `summarize_counts` reads it into one `summarize_patch` block per count, the
patch command's statistics, and `features_needed` chooses the sentence: the first k features are
enough to undo the flips only when their recovery's interval lies above the target and as many
matched control features recover less than `MAX_CONTROL` of the margin. The sentence speaks of
the features given, not of a mechanism: whether they carry the framing is discovery's claim.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.experiments.patching import summarize_patch

__all__ = ["MAX_CONTROL", "MIN_CASES", "TARGET", "count_features", "features_needed", "summarize_counts"]

TARGET = 0.5  # the share of the margin a set of features must recover to undo the flips
MAX_CONTROL = 0.1  # what as many matched control features may recover
MIN_CASES = 10  # below this many flips an estimate says so


def count_features(
    vlm: Any,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int],
    store_path: str | Path,
    *,
    target: float = TARGET,
    seed: int = 0,
    **sweep: Any,
) -> dict[str, Any]:
    """`count_sweep` of `features` (in rank order) into the resumable store `store_path` (`sweep`:
    its keyword arguments, e.g. `pairs`), then `summarize_counts`, also written beside the store
    as `<stem>.json`."""
    from flipscope.data.store import iter_rows, read_header
    from flipscope.experiments.sweeps import count_sweep

    store = count_sweep(vlm, sae, bank, features, store_path, **sweep)
    summary = summarize_counts(iter_rows(store.path), read_header(store.path), target=target, seed=seed)
    write_json(store.path.with_suffix(".json"), summary)
    return summary


def summarize_counts(
    rows: Iterable[Mapping[str, Any]], header: Mapping[str, Any], *, target: float = TARGET, seed: int = 0
) -> dict[str, Any]:
    """Per count k (a `count_sweep` store's rows and header): `summarize_patch` of its rows, the
    matched controls' rows as its `matched_control_feature` (those features as `control_features`);
    and `features_needed`'s reading. `controls` lists each count's control features.

    Raises:
        FlipscopeError: the header is not a count sweep's, or a count has no rows.
    """
    if header.get("kind") != "count-sweep":
        raise FlipscopeError(f"store header kind is {header.get('kind')!r}; expected 'count-sweep'")
    by_variant: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(str(row["variant"]), {})[row["case"]] = dict(row)
    features = [int(f) for f in header["features"]]
    controls = header.get("controls") or []
    if controls and isinstance(controls[0], int):  # a store of one nested list: its prefixes
        controls = [controls[:k] for k in range(1, len(features) + 1)]
    counts = []
    for k in range(1, len(features) + 1):
        patched = by_variant.get(f"features:{k}")
        if not patched:
            raise FlipscopeError(f"the count sweep has no rows for the first {k} features; is the store complete?")
        control = by_variant.get(f"controls:{k}", {})
        if control and set(control) != set(patched):
            raise FlipscopeError(f"count {k}: the store's controls cover other cases than its patch; is it complete?")
        merged = [{**row, "m_control_feature": control[case]["m_patched"]} if control else row
                  for case, row in patched.items()]  # fmt: skip
        chosen = controls[k - 1] if control and controls else None
        counts.append(
            {"k": k, "features": features[:k], "control_features": chosen, **summarize_patch(merged, seed=seed)}
        )
    out = {"hook": header["hook"], "features": features, "controls": controls or None, "counts": counts}
    if header.get("no_control"):
        out["no_control"] = header["no_control"]
    out["needed"] = features_needed(counts, target=target)
    return out


def features_needed(counts: list[Mapping[str, Any]], *, target: float = TARGET) -> dict[str, Any]:
    """The smallest count whose flips' recovery interval lies above `target` while as many matched
    control features recover less than `MAX_CONTROL` (`k`, else None), the smallest whose point
    reaches it (`k_point`), and the sentence those numbers choose."""
    if not counts:
        raise FlipscopeError("no counts to read")
    n = int(counts[0]["flips"]["n"])
    few = f"From {n} flips (fewer than {MIN_CASES}, a rough estimate): " if n < MIN_CASES else ""

    def control(c: Mapping[str, Any]) -> float | None:
        block = c.get("matched_control_feature")
        return None if block is None else float(block["mean_recovery"]["value"])

    reached = [c for c in counts if c["flips"]["mean_recovery"]["value"] >= target]
    above = [c for c in counts if c["flips"]["mean_recovery"]["low"] >= target]
    specific = [c for c in above if control(c) is not None and abs(control(c)) < MAX_CONTROL]
    out: dict[str, Any] = {
        "target": target,
        "k": specific[0]["k"] if specific else None,
        "k_point": reached[0]["k"] if reached else None,
    }
    if specific:
        c = specific[0]
        out["reading"] = (
            f"{few}the first {c['k']} feature(s) recover {_est(c['flips']['mean_recovery'])} of the margin, the "
            f"interval above {target}, while as many matched control features recover {control(c):+.2f}: "
            f"{c['k']} of these features are enough to undo the flips here."
        )
    elif above:
        c = above[0]
        what = "no matched controls could be found" if control(c) is None else f"recover {control(c):+.2f}"
        out["reading"] = (
            f"{few}the first {c['k']} feature(s) recover {_est(c['flips']['mean_recovery'])} of the margin, but "
            f"as many matched control features {what}: the recovery is not shown to be specific to these features."
        )
    elif reached:
        c = reached[0]
        out["reading"] = (
            f"{few}the first {c['k']} feature(s) recover {_est(c['flips']['mean_recovery'])} of the margin, but the "
            f"interval reaches below {target}: these flips do not settle how many of these features undo them."
        )
    else:
        last = counts[-1]
        out["reading"] = (
            f"{few}no count up to {last['k']} recovers {target} of the margin (all {last['k']} together: "
            f"{_est(last['flips']['mean_recovery'])}): these features do not undo the flips here; what flipped them "
            "is spread over more features, or lies outside them."
        )
    return out


def _est(e: Mapping[str, Any]) -> str:
    return f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"
