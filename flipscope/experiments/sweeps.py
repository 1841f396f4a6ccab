"""Patching sweeps: one variant at a time over every FlipBank case, into resumable stores.

`patch_sweep` removes each feature alone (delta-only, last position); `count_sweep` removes the
first k of a ranking together, k = 1..K, beside as many matched control features; `layer_sweep`
puts the original's residual in at each layer's `hook_resid_post`, last position. All run on the
last-token fast path: an edit at the last position cannot reach earlier positions, so each
prompt runs once up to its last token and the last token once per variant on that key/value
cache (equal to full forwards within 1e-5, tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from flipscope.data.store import ResultStore
from flipscope.errors import FlipscopeError
from flipscope.experiments.pairs import PairActivations, collect_pairs
from flipscope.interventions.hooks import replace_at_last, subtract_at_last
from flipscope.interventions.last_token import variant_margins
from flipscope.model.answers import require_finite
from flipscope.model.hook_names import resid_post
from flipscope.model.protocol import VLM
from flipscope.model.vision_once import images_once
from flipscope.sae.encode import check_features
from flipscope.sae.load import check_sae

__all__ = ["count_sweep", "layer_sweep", "patch_sweep"]


@images_once
def _sweep(
    vlm: VLM,
    pairs: PairActivations,
    header: dict[str, Any],
    store_path: Any,
    n_variants: int,
    hooks_for: Any,
    labels: list[Any],
    *,
    fast: bool,
    rows_per_forward: int,
    batch_size: int,
    progress: bool,
    desc: str,
    shard: tuple[int, int] | None = None,
) -> ResultStore:
    """Run `n_variants` hooked variants of every case's paraphrase into a resumable store.

    Cases go in fixed chunks (so a resumed run recomputes whole chunks exactly as before) of
    about `rows_per_forward / n_variants` cases, each run `batch_size` prompts at a time (the
    prompt forward is a batch like any other; the last token's rows then hold a copy of its
    key/value cache each); `hooks_for(indices)` gives the hooks for those cases' case × variant
    rows, case-major. With `shard=(K, N)` only chunks K mod N are run (`merge_shards` joins the N
    stores).
    """
    per_chunk = max(1, rows_per_forward // n_variants)
    fast = fast and getattr(vlm, "fast_path_off", None) is None
    header = {**header, "fast": fast, "cases_per_unit": per_chunk}
    if shard is not None:
        header["shard"] = list(shard)
    store = ResultStore.open(store_path, header)
    para_specs = pairs.paraphrase_specs()
    chunks = [list(range(i, min(i + per_chunk, len(pairs.cases)))) for i in range(0, len(pairs.cases), per_chunk)]
    mine = [(k, chunk) for k, chunk in enumerate(chunks) if shard is None or k % shard[1] == shard[0]]
    todo = [(k, chunk) for k, chunk in mine if f"cases/{k}" not in store.done]
    with store:
        for k, chunk in tqdm(todo, desc=desc, disable=not progress or not todo):
            margins = torch.cat(  # at most `batch_size` prompts per forward, as every other stage runs
                [
                    variant_margins(vlm, [para_specs[i] for i in part], n_variants, hooks_for(part), fast=fast)
                    for part in (chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
                ]
            )
            require_finite(
                margins.flatten(),
                lambda r, chunk=chunk: f"case {pairs.cases[chunk[r // n_variants]]['id']!r}, {labels[r % n_variants]}",
            )
            out = []
            for i, case_margins in zip(chunk, margins.tolist(), strict=True):
                case = pairs.cases[i]
                for label, m in zip(labels, case_margins, strict=True):
                    out.append(
                        {
                            "case": case["id"],
                            "kind": "flip" if pairs.is_flip[i] else "control",
                            "direction": case.get("direction"),
                            "variant": label,
                            "m_orig": float(pairs.margin_orig[i]),
                            "m_para": float(pairs.margin_para[i]),
                            "m_patched": m,
                        }
                    )
            store.append(f"cases/{k}", out)
    return store


def patch_sweep(
    vlm: VLM,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int],
    store_path: Any,
    *,
    fast: bool = True,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    rows_per_forward: int = 1024,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> ResultStore:
    """Delta-only patch of each feature in `features` alone, on every case, into a resumable
    store (one unit per chunk of cases; rows carry `variant` = the feature); `shard=(K, N)` runs
    chunks K mod N only.

    With `fast`, each case's prompt runs once up to its last token and the last token once per
    feature on that cache (`score_last_token`); otherwise every variant is a full forward.
    """
    hook = check_sae(sae, vlm)
    check_features(sae, features)
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    delta = pairs.feature_delta(sae, hook)[:, list(features)]
    w_dec = sae.W_dec.detach()[list(features)]
    header = {
        "kind": "patch-sweep",
        "hook": hook,
        "features": [int(f) for f in features],
        "model": vlm.identity(),
        "bank": bank.get("source", {}).get("questions"),
        "n_cases": len(pairs.cases),
    }

    def hooks_for(chunk: list[int]) -> list:
        vectors = (delta[chunk][:, :, None] * w_dec).reshape(-1, w_dec.shape[1])  # case-major rows
        return [(hook, subtract_at_last(vectors))]

    labels = [int(f) for f in features]
    return _sweep(
        vlm,
        pairs,
        header,
        store_path,
        len(features),
        hooks_for,
        labels,
        fast=fast,
        rows_per_forward=rows_per_forward,
        batch_size=batch_size,
        progress=progress,
        desc="feature sweep",
        shard=shard,
    )


def layer_sweep(
    vlm: VLM,
    bank: Mapping[str, Any],
    store_path: Any,
    *,
    layers: Sequence[int] | None = None,
    fast: bool = True,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    rows_per_forward: int = 1024,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> ResultStore:
    """Original-value patching at each layer's `hook_resid_post`, last position, on every case:
    where along the depth the original's state still undoes the flip (rows: `variant` = layer)."""
    layers = list(range(vlm.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [layer for layer in layers if not 0 <= layer < vlm.n_layers]
    if bad:
        raise FlipscopeError(f"layers {bad} do not exist; the model has layers 0..{vlm.n_layers - 1}")
    names = [resid_post(layer) for layer in layers]
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, names, batch_size=batch_size, progress=progress)
    header = {
        "kind": "layer-sweep",
        "layers": layers,
        "model": vlm.identity(),
        "bank": bank.get("source", {}).get("questions"),
        "n_cases": len(pairs.cases),
    }

    def hooks_for(chunk: list[int]) -> list:
        variant = torch.arange(len(names)).repeat(len(chunk))  # case-major: rows cycle through layers
        out = []
        for k, name in enumerate(names):
            values = pairs.orig[name][chunk].repeat_interleave(len(names), dim=0)
            out.append((name, replace_at_last(values, variant == k)))
        return out

    return _sweep(
        vlm,
        pairs,
        header,
        store_path,
        len(names),
        hooks_for,
        layers,
        fast=fast,
        rows_per_forward=rows_per_forward,
        batch_size=batch_size,
        progress=progress,
        desc="layer sweep",
        shard=shard,
    )


def count_sweep(
    vlm: VLM,
    sae: Any,
    bank: Mapping[str, Any],
    features: Sequence[int],
    store_path: Any,
    *,
    fast: bool = True,
    pairs: PairActivations | None = None,
    batch_size: int = 32,
    rows_per_forward: int = 1024,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> ResultStore:
    """Delta-only patch of the first k of `features` together, k = 1..len(features), on every
    case, beside as many matched control features, each by its own Δf: those `patch` matches to
    the first k (`prefix_control_features`), so a count's controls are the patch's own for that
    set. Into a resumable store: rows carry `variant` = `features:k` or `controls:k`; the header
    names each count's controls, or says why there are none."""
    from flipscope.experiments.patching import prefix_control_features
    from flipscope.sae.encode import decoder_vectors

    hook = check_sae(sae, vlm)
    check_features(sae, features)
    if len(set(features)) != len(features):
        raise FlipscopeError(f"features {list(features)} name a feature twice; a count needs distinct features")
    pairs = pairs if pairs is not None else collect_pairs(vlm, bank, [hook], batch_size=batch_size, progress=progress)
    header = {"kind": "count-sweep", "hook": hook, "features": [int(f) for f in features], "controls": None}
    try:
        controls = prefix_control_features(sae, hook, pairs, features)
        header["controls"] = controls
    except FlipscopeError as err:
        controls, header["no_control"] = [], str(err)
    header.update(model=vlm.identity(), bank=bank.get("source", {}).get("questions"), n_cases=len(pairs.cases))
    deltas = pairs.feature_delta(sae, hook)
    ranked, w_dec = list(features), sae.W_dec.detach()[list(features)]
    labels = [
        f"{name}:{k}" for name in ("features", "controls")[: 1 + bool(controls)] for k in range(1, len(ranked) + 1)
    ]

    def hooks_for(chunk: list[int]) -> list:  # only this chunk's case × k × d_model vectors are held
        delta = deltas[chunk]
        parts = [(delta[:, ranked, None] * w_dec).cumsum(1)]  # the first k features: prefix sums
        parts += [torch.stack([decoder_vectors(sae, delta[:, c], c) for c in controls], 1)] if controls else []
        vectors = torch.cat(parts, dim=1)
        return [(hook, subtract_at_last(vectors.reshape(-1, vectors.shape[-1])))]  # case-major: features, controls

    return _sweep(
        vlm, pairs, header, store_path, len(labels), hooks_for, labels,
        fast=fast, rows_per_forward=rows_per_forward, batch_size=batch_size, progress=progress,
        desc="feature count sweep", shard=shard,
    )  # fmt: skip
