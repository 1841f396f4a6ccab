"""`feature_dashboard` two ways, alternating in one run: each batch's prompt part before
the questions run once per film and the questions and tails on its key/value cache, both forwards
ending at the SAE's hook (`fast`), against whole prompts in forwards that end there (`whole`).

Each path starts from an empty image memo (every film through the tower once, as a run alone
would), counts the tokens each decoder layer runs and the tower's runs, and the two dashboards'
numbers are compared: every segment mean and every shift. Then the effects panel
(`feature_effects`, each feature's row and its random directions written at the answer position)
two ways: each prompt run once to its last token and that token once per write, against a full
forward per write; and its removals (`removal_effects`) on the questions and tails after each film's
prefix run once, against whole prompts. Used by `bench_medgemma.py` (stage
`dashboard`) at MedGemma's shapes, at the SAE's layer and at layer 0's attention output; run alone,
on the shipped organism's FlipBank with its two SAEs (the features the demo removes at each).
Run: `.venv/bin/python benchmarks/bench_dashboard.py [--out FILE]`.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flipscope.data.atomic import write_json
from flipscope.data.flipbank import load_flipbank
from flipscope.experiments.dashboard import feature_dashboard
from flipscope.experiments.feature_effects import feature_effects, removal_effects
from flipscope.experiments.feature_logits import feature_writes
from flipscope.experiments.pairs import bank_cases, pair_specs
from flipscope.organism import default_organism_dir, load_organism
from flipscope.sae.load import check_sae, load_sae

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
ORGANISM_FEATURES = {"sae": [38, 3, 15, 24, 61], "sae_entry": [10, 62, 39, 29, 23]}  # as the demo removes them


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
    vlm: Any, sae: Any, bank: Mapping[str, Any], features: Sequence[int], batch_size: int = 8, rounds: int = 2
) -> dict[str, Any]:
    """Seconds (the fastest of `rounds`, the two ways alternating), decoder-layer tokens and tower
    runs of the dashboard each way (its logits and effects panels left out), their ratio, the largest difference
    between the two dashboards' numbers (beside the largest number), and the seconds of the logits
    panel alone (`feature_writes`: the whole unembedding read in blocks, and the answer alignment's
    null)."""
    row: dict[str, Any] = {"features": list(features), "rounds": rounds}
    found, seconds = {}, {"fast": [], "whole": []}
    for _ in range(rounds):
        for path, fast in (("fast", True), ("whole", False)):
            vlm.image_memo.clear()
            handles, counts, towers = layer_tokens(vlm)
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    found[path] = feature_dashboard(vlm, sae, bank, features, batch_size=batch_size, fast=fast,
                                                    logits=0, effects=0, progress=False)  # fmt: skip
                seconds[path].append(time.perf_counter() - start)
            finally:
                for handle in handles:
                    handle.remove()
            row[f"{path}_layer_tokens"], row[f"{path}_tower_runs"] = counts, len(towers)
    for path, times in seconds.items():
        row[f"{path}_s"], row[f"{path}_s_rounds"] = min(times), times
    row["prompts"] = found["fast"]["meta"]["n_prompts"]
    row["ratio"] = row["whole_s"] / row["fast_s"]
    pairs = list(zip(_numbers(found["fast"]), _numbers(found["whole"]), strict=True))
    row["max_abs_diff"] = max(abs(a - b) for a, b in pairs)
    row["max_abs_value"] = max(abs(b) for _, b in pairs)  # the scale the difference is against
    start = time.perf_counter()
    feature_writes(vlm, sae, features)
    row["writes_s"] = time.perf_counter() - start
    return row


def effects_paths(
    vlm: Any, sae: Any, bank: Mapping[str, Any], features: Sequence[int], prompts: int, n_random: int, rounds: int = 2
) -> dict[str, Any]:
    """Seconds of `feature_effects` on the bank's first `prompts` prompts (the fastest of `rounds`,
    alternating) on the last-token path and as full forwards, their ratio, the writes per prompt
    and the largest difference between the two ways' effects (beside the largest effect); under
    `removal`, the same for `removal_effects` on the suffix path and on whole prompts."""
    specs = pair_specs(bank_cases(bank)[0])[0][:prompts]
    hook, scales = check_sae(sae, vlm), [4.0] * len(features)
    seconds: dict[str, list[float]] = {"fast": [], "whole": []}
    found: dict[str, Any] = {}
    for _ in range(rounds):
        for path, fast in (("fast", True), ("whole", False)):
            start = time.perf_counter()
            found[path] = feature_effects(vlm, sae, hook, features, scales, specs, n_random=n_random, fast=fast)
            seconds[path].append(time.perf_counter() - start)
    row = {"features": list(features), "prompts": len(specs), "writes_per_prompt": 2 * len(features) * (1 + n_random),
           **_ways(found, seconds, "effect")}  # fmt: skip
    seconds, found = {"fast": [], "whole": []}, {}
    for _ in range(rounds):
        for path, fast in (("fast", True), ("whole", False)):
            start = time.perf_counter()
            found[path] = removal_effects(vlm, sae, hook, features, specs, n_random=n_random, fast=fast)
            seconds[path].append(time.perf_counter() - start)
    row["removal"] = {"removals_per_prompt": len(features) * (1 + n_random), **_ways(found, seconds, "effect")}
    return row


def _ways(found: Mapping[str, Any], seconds: Mapping[str, list[float]], key: str) -> dict[str, Any]:
    """The two ways' fastest seconds, their ratio and the largest difference of their `key` values."""
    pairs = [(found["fast"][f][key]["value"], found["whole"][f][key]["value"]) for f in found["fast"]]
    fast_s, whole_s = min(seconds["fast"]), min(seconds["whole"])
    return {"fast_s": fast_s, "whole_s": whole_s, "rounds": dict(seconds), "ratio": whole_s / fast_s,
            "max_abs_diff": max(abs(a - b) for a, b in pairs),
            "max_abs_value": max(abs(b) for _, b in pairs)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dashboard.json"))
    args = parser.parse_args()
    vlm, _, _ = load_organism()
    bank = load_flipbank(BANK)
    result: dict[str, Any] = {"machine": platform.machine(), "torch": torch.__version__, "sites": {}}
    for name, features in ORGANISM_FEATURES.items():
        sae = load_sae(default_organism_dir() / name)
        row = dashboard_paths(vlm, sae, bank, features, batch_size=args.batch, rounds=args.rounds)
        row["effects"] = effects_paths(vlm, sae, bank, features, prompts=16, n_random=16, rounds=args.rounds)
        result["sites"][check_sae(sae, vlm)] = row
        print(f"{check_sae(sae, vlm)}: {row['prompts']} prompts, fast {row['fast_s']:.2f} s, whole "
              f"{row['whole_s']:.2f} s, ratio {row['ratio']:.2f}x, max diff {row['max_abs_diff']:.1e}")  # fmt: skip
        e = row["effects"]
        print(f"  effects: {e['prompts']} prompts x {e['writes_per_prompt']} writes, last-token path "
              f"{e['fast_s']:.2f} s, full forwards {e['whole_s']:.2f} s, ratio {e['ratio']:.1f}x, "
              f"max diff {e['max_abs_diff']:.1e}")  # fmt: skip
        r = e["removal"]
        print(f"  removal: {r['removals_per_prompt']} a prompt, suffix path {r['fast_s']:.2f} s, whole prompts "
              f"{r['whole_s']:.2f} s, ratio {r['ratio']:.1f}x, max diff {r['max_abs_diff']:.1e}")  # fmt: skip
    write_json(args.out, result, indent=2)


if __name__ == "__main__":
    main()
