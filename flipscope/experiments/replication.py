"""Held-out replication: discover on one half of a FlipBank, patch on the other.

Choosing features and measuring them on the same flips lets the choice fit the noise of those
flips; on a model where nobody planted the answer there is no card to check the choice against.
So the bank is split by question (every case about one film and finding, with their controls,
lands in one half, so no prompt is in both), features are chosen on the discovery half exactly as
the demo chooses them (framing features beyond the pair-swap null, else attribution), and the
recovery reported is the held-out half's, with its controls: the same-wording non-flips and the
matched control feature, both patched in the same runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flipscope.errors import FlipscopeError
from flipscope.model.protocol import VLM

__all__ = ["MIN_HALF_FLIPS", "choose_features", "replicate", "split_bank"]

MIN_HALF_FLIPS = 3  # fewer flips in a half and there is nothing to discover on or to hold out


def split_bank(bank: Mapping[str, Any], seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two halves of `bank` by question, flips balanced between them (groups of cases of one
    question are dealt, largest first in a seeded order, to the half with fewer flips); each
    control goes with the flip it controls for.

    Raises:
        FlipscopeError: fewer than two questions with flips (nothing to hold out).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for case in bank["flips"]:
        groups.setdefault(case["question_id"], []).append(case)
    if len(groups) < 2:
        raise FlipscopeError(f"the FlipBank's flips come from {len(groups)} question(s); a split needs at least 2")
    rng = np.random.default_rng(seed)
    names = [str(q) for q in rng.permutation(sorted(groups))]
    names.sort(key=lambda q: -len(groups[q]))  # stable: the seeded order breaks ties
    halves: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for name in names:
        min(halves, key=len).extend(groups[name])
    out = []
    for flips in halves:
        ids = {c["id"] for c in flips}
        controls = [c for c in bank["controls"] if c.get("control_for") in ids]
        half = dict(bank) | {"flips": flips, "controls": controls, "n_flips": len(flips), "n_controls": len(controls)}
        out.append(half)
    return out[0], out[1]


def choose_features(found: Any, top_k: int) -> tuple[list[int], str]:
    """The features the demo patches: framing features beyond the null, else the first by
    attribution; with how they were chosen."""
    chosen = found.framing_features(top_k)
    if chosen:
        return chosen, "framing specificity"
    return [int(f) for f in found.top(top_k, by="attribution")["feature"]], "attribution (no feature beats the null)"


def replicate(vlm: VLM, sae: Any, bank: Mapping[str, Any], *, top_k: int = 5, seed: int = 0, progress: bool = True):
    """Discovery on one half, patching on the other, in both directions.

    Returns one entry per direction: the halves' sizes, the features chosen on the discovery
    half (and how), that half's verdict, and the held-out half's patch summary (recovery with
    CI, non-flip controls, matched control feature). Empty when the bank cannot be split into
    halves of at least `MIN_HALF_FLIPS` flips each.
    """
    from flipscope.experiments.discovery import discover
    from flipscope.experiments.patching import patch_bank
    from flipscope.sae.load import check_sae

    hook = check_sae(sae, vlm)
    layer = int(hook.split(".")[1])
    if len({c["question_id"] for c in bank["flips"]}) < 2:
        return []
    halves = split_bank(bank, seed)
    if min(h["n_flips"] for h in halves) < MIN_HALF_FLIPS:
        return []
    runs = []
    for name, (found_on, held_out) in {"A→B": halves, "B→A": halves[::-1]}.items():
        found = discover(vlm, sae, found_on, layers=[layer], exact_top=0, seed=seed, progress=progress)
        features, chosen_by = choose_features(found, top_k)
        patched = patch_bank(vlm, sae, held_out, features, progress=progress)
        runs.append(
            {
                "direction": name,
                "discovery_flips": found_on["n_flips"],
                "held_out_flips": held_out["n_flips"],
                "held_out_controls": held_out["n_controls"],
                "features": features,
                "chosen_by": chosen_by,
                "verdict": found.verdict,
                "found": found.found,
                "patch": patched.summary,
            }
        )
    return runs
