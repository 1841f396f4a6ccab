"""`feature_dashboard` two ways, one after the other in one run: each batch's prompt part before
the questions run once per film and the questions and tails on its key/value cache, both forwards
ending at the SAE's hook (`fast`), against whole prompts in forwards that end there (`whole`).

Each path starts from an empty image memo (every film through the tower once, as a run alone
would), counts the tokens each decoder layer runs and the tower's runs, and the two dashboards'
numbers are compared: every segment mean and every shift. Used by `bench_medgemma.py` (stage
`dashboard`) at MedGemma's shapes, at the SAE's layer and at layer 0's attention output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from flipscope.experiments.dashboard import feature_dashboard
from flipscope.experiments.feature_logits import feature_writes


def layer_tokens(vlm: Any) -> tuple[list, list[int], list[int]]:
    """Hook handles and the lists they fill: tokens each decoder layer runs, images per tower run."""
    counts, towers = [0] * vlm.n_layers, []

    def counter(i: int):
        def count(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            counts[i] += int(hidden.shape[:2].numel())

        return count

    handles = [
        layer.register_forward_pre_hook(counter(i), with_kwargs=True)
        for i, layer in enumerate(vlm.hf_model.model.language_model.layers)
    ]
    handles.append(vlm.hf_model.model.vision_tower.register_forward_hook(lambda m, i, o: towers.append(o[0].shape[0])))
    return handles, counts, towers


def _numbers(found: Mapping[str, Any]) -> Iterator[float]:
    """Every segment mean and shift value of a dashboard, in a fixed order."""
    for feature in found["features"].values():
        for places in feature["segments"].values():
            yield from (v["mean"] for k, v in places.items() if k != "n_prompts" and v["mean"] is not None)
        for place in feature["shift"].values():
            yield from (place[who]["value"] for who in ("flips", "controls") if place[who]["value"] is not None)


def dashboard_paths(
    vlm: Any, sae: Any, bank: Mapping[str, Any], features: Sequence[int], batch_size: int = 8
) -> dict[str, Any]:
    """Seconds, decoder-layer tokens and tower runs of the dashboard each way (its logits panel
    left out), their ratio, the largest difference between the two dashboards' numbers (beside the
    largest number), and the seconds of the logits panel alone (`feature_writes`: the whole
    unembedding read in blocks, and the answer alignment's null)."""
    row: dict[str, Any] = {"features": list(features)}
    found = {}
    for path, fast in (("fast", True), ("whole", False)):
        vlm.image_memo.clear()
        handles, counts, towers = layer_tokens(vlm)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                found[path] = feature_dashboard(vlm, sae, bank, features, batch_size=batch_size, fast=fast,
                                                logits=0, progress=False)  # fmt: skip
            row[f"{path}_s"] = time.perf_counter() - start
        finally:
            for handle in handles:
                handle.remove()
        row[f"{path}_layer_tokens"], row[f"{path}_tower_runs"] = counts, len(towers)
    row["prompts"] = found["fast"]["meta"]["n_prompts"]
    row["ratio"] = row["whole_s"] / row["fast_s"]
    pairs = list(zip(_numbers(found["fast"]), _numbers(found["whole"]), strict=True))
    row["max_abs_diff"] = max(abs(a - b) for a, b in pairs)
    row["max_abs_value"] = max(abs(b) for _, b in pairs)  # the scale the difference is against
    start = time.perf_counter()
    feature_writes(vlm, sae, features)
    row["writes_s"] = time.perf_counter() - start
    return row
