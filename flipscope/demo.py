"""The main job: the paper's story, end to end, on the shipped model organism.

`run_demo` evaluates the organism on held-out films (with the image and with it blanked), curates
its FlipBank, discovers the features that track the framing, patches them out, clamps the
top one (and ablates the DiffMean direction beside it), and writes every figure and
`report.html`. Every stage calls the same function its CLI command does, with the same
defaults, so the report's numbers are those the commands print; each stage's results go to a
resumable store or file under `work`, so a rerun after a crash recomputes only what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["PAPER", "DemoConfig", "run_demo"]

PAPER = {
    "model": "MedGemma 4B (google/medgemma-4b-it), MIMIC-CXR questions",
    "flip_rate_range": "8–58% across six medical VLMs",
    "flipbank": {"n_flips": 158, "yes_to_no": 94, "no_to_yes": 64},
    "feature": "GemmaScope 2 feature 3818, layer 17 of 34 (blocks.17.hook_resid_post)",
    "pearson_r": 0.71,
    "peak_layer_auc": 0.76,
    "patch_mean_recovery": 0.448,
    "patch_reversed": "23/158",
    "patch_controls_margin_change": 0.03,
    "clamp_flip_rate": [0.156, 0.108],
    "clamp_accuracy": [0.782, 0.769],
    "clamp_text_only_agreement": [0.664, 0.631],
}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs.

    Attributes:
        n_films: Held-out films evaluated (4 questions each, 10 prompts per question).
        conditions: Image conditions; `blank` is the paper's "image removed".
        top_k: Features patched together: the first `top_k` by attribution.
        clamp_values: Values the top feature is clamped to (the trade-off curve).
        seed: Seed of every bootstrap and of the control draw.
    """

    n_films: int = 40
    conditions: tuple[str, ...] = ("image", "blank")
    top_k: int = 5
    clamp_values: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    seed: int = 0


class _Stages:
    """Times each stage and reports progress on one line per stage."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.echo(f"[{len(self.seconds) + 1}/8] {name} ...")
        start = time.perf_counter()
        value = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return value


def _layer_recovery(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Mean recovery over flips, with its CI, of original-value patching at each layer."""
    from flipscope.patching import summarize_patch

    layers = sorted({r["variant"] for r in rows})
    return [
        {
            "layer": int(layer),
            **summarize_patch([r for r in rows if r["variant"] == layer], seed)["flips"]["mean_recovery"],
        }
        for layer in layers
    ]


def _clamp_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    base = report["baseline"]["overall"]
    points = [{"label": "as is", "kind": "baseline", "flip_rate": base["flip_rate"], "accuracy": base["accuracy"]}]
    for entry in report["interventions"]:
        o = entry["summary"]["overall"]
        if "clamp" in entry["description"]:
            (value,) = set(entry["description"]["clamp"]["values"].values())
            label, kind = f"{value:g}", "clamp"
        else:
            label = kind = f"{entry['description']['ablate_direction']['name']} ablated"
        points.append({"label": label, "kind": kind, "flip_rate": o["flip_rate"], "accuracy": o["accuracy"]})
    return points


def build_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Every figure of a demo run, from its `summary` (and the files it names): the demo calls
    this, and so does `analyses/figures.py` to redraw them from a finished run."""
    from flipscope import plots
    from flipscope.evaluate import flip_rate_cells
    from flipscope.store import read_rows

    files = summary["files"]
    rows = json.loads(Path(files["patch_discovered"]).read_text())["cases"]
    chosen = summary["patching"]["discovered"]["setup"]["features"]
    feature = summary["clamping"]["feature"]
    seed = summary["settings"]["seed"]
    return {
        "margin_recovery": plots.margin_recovery(
            rows, title=f"Removing features {chosen}: margin per flip, original → paraphrase → patched"
        ),
        "recovery_distribution": plots.recovery_distribution(
            rows, title=f"Recovery for features {chosen}, and its controls"
        ),
        "quadrants": plots.quadrant_map(summary["evaluation"], title="Consistency × image reliance (held-out films)"),
        "flip_rates": plots.flip_rates(flip_rate_cells(read_rows(files["evaluation"]), seed=seed)),
        "feature_activation": plots.feature_activation(summary["feature_activation"]),
        "clamp_tradeoff": plots.clamp_tradeoff(
            _clamp_points(summary["clamping"]), title=f"Clamping feature {feature}: flip rate against accuracy"
        ),
        "layer_auc": plots.layer_profile(summary["discovery"]["layers"], summary["patching"]["layers"]),
    }


def run_demo(
    out: str | Path = "figures",
    work: str | Path | None = None,
    *,
    organism: str | Path | None = None,
    cfg: DemoConfig = DemoConfig(),
    png: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage on the organism; write figures, `summary.json` and `report.html` to `out`
    and the stages' stores to `work` (default `out/work`). Returns the summary.

    Raises:
        FlipscopeError: the organism cannot be loaded, or a stage finds bad input.
    """
    from flipscope import plots
    from flipscope.clamp import DirectionAblatedVLM, compare_clamped
    from flipscope.evaluate import summarize
    from flipscope.features import activation_by_family, discover, records
    from flipscope.flipbank import curate, load_flipbank, save_flipbank
    from flipscope.organism import default_organism_dir, load_organism
    from flipscope.organism.bank import DEFAULT_RULES
    from flipscope.organism.config import OrganismConfig
    from flipscope.organism.questions import export_questions
    from flipscope.pairs import collect_pairs
    from flipscope.patching import layer_sweep, patch_bank
    from flipscope.questions import load_questions
    from flipscope.report import write_report
    from flipscope.store import read_header, read_rows
    from flipscope.sweep import EvalConfig, run_sweep

    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    stages = _Stages(echo)
    total = time.perf_counter()
    directory = Path(organism) if organism is not None else default_organism_dir()
    vlm, sae, card = load_organism(directory)  # before anything is written: a bad organism leaves no folder
    out.mkdir(parents=True, exist_ok=True)
    hook = card["hook_name"]
    rules = DEFAULT_RULES

    # 1. evaluation: every question × prompt × {image, blank}
    def evaluate():
        questions_path = export_questions(OrganismConfig.from_dict(card["config"]), work / "data", n_films=cfg.n_films)
        questions = load_questions(questions_path)
        store = run_sweep(
            vlm, questions, EvalConfig(conditions=cfg.conditions), work / "evaluation" / "results.jsonl",
            progress=progress,
        )  # fmt: skip
        return questions_path, questions, store.path

    questions_path, questions, eval_path = stages.run("evaluating (image and blank)", evaluate)
    eval_rows = read_rows(eval_path)
    evaluation = summarize(eval_rows, seed=cfg.seed)

    # 2. FlipBank
    def make_bank():
        bank = curate(eval_rows, questions, rules, source=read_header(eval_path))
        return save_flipbank(bank, work / "flipbank.json")

    bank_path = stages.run("curating the FlipBank", make_bank)
    bank = load_flipbank(bank_path)
    if not bank["n_flips"]:
        raise FlipscopeError(f"the organism made no flips on {cfg.n_films} films; nothing to explain")

    # 3. discovery, on pair activations at every layer (patching reuses them)
    def find():
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(vlm.n_layers)]
        pairs = collect_pairs(vlm, bank, hooks, progress=progress)
        return pairs, discover(vlm, sae, bank, pairs=pairs, seed=cfg.seed, progress=progress)

    pairs, found = stages.run("discovering features", find)
    found.save(work / "discovery.json")
    chosen = [int(f) for f in found.top(cfg.top_k, by="attribution")["feature"]]
    ranked = found.top(len(found.table), by="attribution")
    clamp_feature = int(ranked[ranked["mean_delta_flip"] > 0]["feature"].iloc[0])  # the first the framing switches on

    # 4. patching: the discovered features, the card's planted set, and every layer
    def patch():
        planted = [f["feature"] for f in card["framing_features"] if f["aligned"]]
        discovered = patch_bank(vlm, sae, bank, chosen, pairs=pairs, progress=progress)
        card_set = patch_bank(vlm, sae, bank, planted, pairs=pairs, progress=progress)
        single = patch_bank(vlm, sae, bank, [clamp_feature], pairs=pairs, progress=progress)
        layers = layer_sweep(vlm, bank, work / "layer_sweep.jsonl", pairs=pairs, progress=progress)
        return discovered, card_set, single, read_rows(layers.path), planted

    discovered, card_set, single, layer_rows, planted = stages.run("patching", patch)
    for name, result in (("patch_discovered", discovered), ("patch_card", card_set), ("patch_single", single)):
        (work / f"{name}.json").write_text(json.dumps({"summary": result.summary, "cases": result.rows}) + "\n")

    # 5. clamping, with the DiffMean direction ablated beside it
    def clamp():
        import torch

        ablated = DirectionAblatedVLM(vlm, hook, torch.tensor(found.diffmean["direction"]), name="DiffMean")
        clamps = [{clamp_feature: v} for v in cfg.clamp_values]
        return compare_clamped(
            vlm, sae, questions, clamps, work / "clamp", EvalConfig(conditions=cfg.conditions),
            also={"diffmean": ablated}, baseline_store=eval_path, progress=progress,
        )  # fmt: skip

    clamping = stages.run(f"clamping feature {clamp_feature}", clamp)
    (work / "clamp.json").write_text(json.dumps(clamping, indent=1) + "\n")

    # 6. feature activations by question family
    cells = stages.run(
        "reading feature activations", lambda: activation_by_family(vlm, sae, questions, chosen, seed=cfg.seed)
    )

    summary = {
        "settings": {**asdict(cfg), "organism": str(directory)},
        "organism": {
            "directory": str(directory),
            "hook": hook,
            "n_layers": vlm.n_layers,
            "d_sae": int(sae.cfg.d_sae),
            "shortcut": card["shortcut"],
            "planted_features": planted,
        },
        "files": {
            "questions": str(questions_path),
            "evaluation": str(eval_path),
            "flipbank": str(bank_path),
            "discovery": str(work / "discovery.json"),
            "patch_discovered": str(work / "patch_discovered.json"),
        },
        "evaluation": evaluation,
        "flipbank": {k: bank[k] for k in ("n_flips", "n_controls")}
        | {"by_direction": {d: sum(c["direction"] == d for c in bank["flips"]) for d in ("yes→no", "no→yes")}},
        "discovery": {
            "top": records(found.top(10, by="pearson")),
            "top_attribution": chosen,
            "ablation_check": found.ablation,
            "diffmean_top_features": found.diffmean["top_features"],
            "layers": found.layers,
        },
        "patching": {
            "discovered": discovered.summary,
            "planted": card_set.summary,
            "single": single.summary,
            "layers": _layer_recovery(layer_rows, cfg.seed),
        },
        "clamping": {"feature": clamp_feature, "values": list(cfg.clamp_values), **clamping},
        "feature_activation": cells,
        "paper": PAPER,
    }
    figures = build_figures(summary)
    written = stages.run(
        "writing figures", lambda: plots.save_figures(figures, out, {"demo": summary["settings"]}, png=png)
    )
    if written["png_skipped"]:
        echo(f"PNGs skipped: {written['png_skipped']}; the HTML figures are written")
    summary["figures"] = {"html": [p.name for p in written["html"]], "png": [p.name for p in written["png"]]}
    summary["png_skipped"] = written["png_skipped"]
    summary["commands"] = _commands(directory, questions_path, work, bank_path, chosen, planted, clamp_feature, cfg)
    stages.run("writing the report", lambda: write_report(out / "report.html", summary, figures))
    summary["seconds"] = {**stages.seconds, "total": round(time.perf_counter() - total, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    echo(f"report: {out / 'report.html'}  ({summary['seconds']['total']:.0f} s)")
    return summary


def _commands(
    organism: Path,
    questions: Path,
    work: Path,
    bank: Path,
    chosen: list[int],
    planted: list[int],
    feature: int,
    cfg: DemoConfig,
) -> dict[str, str]:
    """The CLI commands that print each of the report's numbers (rerunning them on `work` resumes
    the demo's own stores, so they compute nothing twice)."""

    def ints(values: list[int]) -> str:
        return ",".join(str(v) for v in values)

    conditions = ",".join(cfg.conditions)
    values = ",".join(f"{v:g}" for v in cfg.clamp_values)
    return {
        "evaluate": f"flipscope evaluate --model {organism} --questions {questions} --conditions {conditions} "
        f"--out {work / 'evaluation'}",
        "curate": f"flipscope curate --results {work / 'evaluation'} --questions {questions} --min-margin 0.2 "
        f"--out {work / 'flipbank-cli.json'}",
        "discover": f"flipscope discover --flipbank {bank} --out {work / 'discovery-cli.json'}",
        "patch_discovered": f"flipscope patch --flipbank {bank} --features {ints(chosen)} "
        f"--out {work / 'patch-discovered'}",
        "patch_planted": f"flipscope patch --flipbank {bank} --features {ints(planted)} --out {work / 'patch-planted'}",
        "patch_single": f"flipscope patch --flipbank {bank} --features {feature} --out {work / 'patch-single'}",
        "clamp": f"flipscope clamp --questions {questions} --features {feature} --values {values} "
        f"--diffmean-from {bank} --conditions {conditions} --out {work / 'clamp'}",
    }
