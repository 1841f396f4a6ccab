"""How much a norm-matched random direction recovers as the model widens: rank-1 patching at the
framing's entry on organisms of the default recipe at several widths, beside its random null.

A random direction's cosine with any fixed direction spreads as 1/√width, so its recovery might be
expected to shrink as 1/√width, and a fixed bar on the null ("the best of 32 random directions
recovers ≤ 0.05") to be stricter on a narrow model than on a wide one. This measures it: each width
trains the default organism's language model at that width (d_mlp and head size scale with it; the
data, the steps and the seed are the default recipe), evaluates the same held-out films with the
image, curates its flips, traces where the framing enters, and patches one direction there beside
the best of `--n-random` norm-matched random directions (expected value from 8× as many). The table
prints what 1/√width predicts from the narrowest width beside what each width gives.

Run: `.venv/bin/python analyses/null_width.py --widths 128,256,512 --work null-width`
(width 128 is the shipped organism; on 2 cores, 256 trains in under 13 minutes and 512 in under an
hour). Each width's checkpoint and its row of `--work/null_width.json` are written when done,
so a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json
from flipscope.data.curation import CurationRules, curate
from flipscope.data.lock import build_once
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.pairs import collect_pairs
from flipscope.experiments.rank1 import rank1_patch
from flipscope.experiments.sites import entry_site
from flipscope.experiments.upstream import trace_framing
from flipscope.model.hooked import HookedVLM
from flipscope.organism import OrganismConfig, default_organism_dir
from flipscope.organism.build import load_card
from flipscope.organism.questions import export_questions
from flipscope.organism.train import train_model

ROWS = "null_width.json"


def width_config(width: int) -> OrganismConfig:
    """The default recipe at `width`: d_mlp 2× and head size width / heads, as at 128."""
    base = OrganismConfig()
    if width % base.n_heads:
        raise SystemExit(f"width {width} is not a multiple of the {base.n_heads} heads")
    return replace(base, d_model=width, d_mlp=2 * width, head_dim=width // base.n_heads)


def checkpoint(cfg: OrganismConfig, work: Path) -> Path:
    """The folder `HookedVLM.from_pretrained` loads for `cfg`: the shipped organism when `cfg` is its
    recipe, else one trained here (once; a folder appears only when it is whole)."""
    shipped = default_organism_dir()
    if OrganismConfig.from_dict(load_card(shipped)["config"]) == cfg:
        return shipped
    folder = work / f"w{cfg.d_model}"

    def train_into(scratch: Path) -> None:
        vlm, _ = train_model(cfg, progress=False)
        vlm.hf_model.save_pretrained(scratch, safe_serialization=True)
        vlm.processor.save_pretrained(scratch)

    return build_once(folder, (folder / "model.safetensors").is_file, train_into)


def measure(width: int, work: Path, n_films: int, n_random: int, trace_cases: int = 64) -> dict[str, Any]:
    """One width's row: its flips, the trace's entry site, rank-1 there and the random null."""
    cfg = width_config(width)
    vlm = HookedVLM.from_pretrained(checkpoint(cfg, work))
    questions = load_questions(export_questions(cfg, work / "questions", n_films=n_films))
    store = run_sweep(
        vlm, questions, EvalConfig(conditions=("image",)), work / f"eval-w{width}" / "results.jsonl", progress=False
    )
    bank = curate(iter_rows(store.path), questions, CurationRules(min_margin=0.2), source=read_header(store.path))
    entry_layer = trace_framing(vlm, bank, max_cases=trace_cases, progress=False).summary()["entry_layer"]
    if entry_layer is None:
        return {"width": width, "n_flips": len(bank["flips"]), "entry": None}
    hook = entry_site(entry_layer)
    found = rank1_patch(vlm, collect_pairs(vlm, bank, [hook], progress=False), hook, n_random=n_random)
    null = found["random"]
    keep = ("best_mean_recovery", "median_mean_recovery", "largest_drawn", "p_value", "n_directions", "n_drawn")
    return {
        "width": width,
        "n_flips": len(bank["flips"]),
        "n_controls": len(bank["controls"]),
        "entry": hook,
        "recovery": found["recovery"],
        "random": {k: null[k] for k in keep},
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as text, with what 1/√width predicts from the narrowest width's best random direction."""
    head = f"{'width':>6}  {'flips':>5}  {'entry':<24} {'rank-1':>7}  {'best random':>11}  {'1/√d':>6}  {'median':>7}"
    lines = [head]
    measured = [r for r in rows if r.get("entry")]
    first = measured[0] if measured else None
    for row in rows:
        if not row.get("entry"):
            lines.append(f"{row['width']:>6}  {row['n_flips']:>5}  the framing words do not explain the shift")
            continue
        null = row["random"]
        scaled = first["random"]["best_mean_recovery"] * math.sqrt(first["width"] / row["width"])
        lines.append(
            f"{row['width']:>6}  {row['n_flips']:>5}  {row['entry']:<24} {row['recovery']['value']:>7.3f}  "
            f"{null['best_mean_recovery']:>11.3f}  {scaled:>6.3f}  {null['median_mean_recovery']:>7.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,256,512", help="Comma-separated model widths.")
    parser.add_argument("--work", type=Path, default=Path("null-width"), help="Checkpoints, stores and rows.")
    parser.add_argument("--films", type=int, default=80, help="Held-out films evaluated per width.")
    parser.add_argument("--n-random", type=int, default=32, help="The null is the best of this many directions.")
    parser.add_argument("--trace-cases", type=int, default=64, help="Flips the trace reads to name the entry.")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    settings = {"films": args.films, "n_random": args.n_random, "trace_cases": args.trace_cases}
    path = args.work / ROWS
    saved = json.loads(path.read_text()) if path.is_file() else {}
    rows = saved.get("rows", []) if saved.get("settings") == settings else []
    for width in widths:
        if not any(r["width"] == width for r in rows):
            rows.append(measure(width, args.work, args.films, args.n_random, args.trace_cases))
            rows.sort(key=lambda r: r["width"])
            write_json(path, {"settings": settings, "rows": rows}, allow_nan=False)
    print(table([r for r in rows if r["width"] in widths]))


if __name__ == "__main__":
    main()
