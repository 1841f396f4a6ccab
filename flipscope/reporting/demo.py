"""The main job: the paper's story, end to end, on the shipped model organism.

`run_demo` evaluates the organism on held-out films (with the image and with it blanked), curates
its FlipBank, discovers the features that track the framing, patches them out, clamps the
top one (and ablates the DiffMean direction beside it), and writes every figure and
`report.html`. The stages are declared in `STAGES`, each a function of the shared `_Run`.
Every stage calls the same function its CLI command does, with the same defaults, so the report's
numbers are those the commands print. Its stores under `work` resume, and a finished stage is read
back while nothing it was computed from changed (`demo_resume`): a rerun recomputes only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json
from flipscope.reporting.demo_config import REAL_DEMO, DemoConfig
from flipscope.reporting.demo_figures import build_figures
from flipscope.reporting.demo_resume import StageRecords, demo_inputs
from flipscope.reporting.demo_summary import PAPER, demo_summary, has_flips

__all__ = ["PAPER", "REAL_DEMO", "DemoConfig", "build_figures", "run_demo"]


@dataclass
class _Run:
    """What the stages share: the inputs, and each stage's results as it finishes."""

    cfg: DemoConfig
    out: Path
    work: Path
    directory: Path
    vlm: Any
    sae: Any
    card: dict[str, Any]
    progress: bool
    png: bool
    echo: Callable[[str], None]
    found: dict[str, Any] = field(default_factory=dict)


def _evaluate(run: _Run) -> None:
    """Every held-out question × prompt × {image, blank}, and its summary."""
    from flipscope.data.questions import load_questions
    from flipscope.data.store import iter_rows
    from flipscope.experiments.evaluation import EvalConfig, run_sweep
    from flipscope.experiments.summary import summarize
    from flipscope.organism.config import OrganismConfig
    from flipscope.organism.questions import export_questions

    cfg, work = run.cfg, run.work
    questions_path = export_questions(OrganismConfig.from_dict(run.card["config"]), work / "data", n_films=cfg.n_films)
    questions = load_questions(questions_path)
    eval_cfg = EvalConfig(conditions=cfg.conditions)
    store = run_sweep(run.vlm, questions, eval_cfg, work / "evaluation" / "results.jsonl", progress=run.progress)
    run.found.update(questions_path=questions_path, questions=questions, eval_path=store.path)
    run.found["evaluation"] = summarize(iter_rows(store.path), seed=cfg.seed)


def _curate(run: _Run) -> None:
    """The organism's FlipBank, by the rules its shipped bank was made with."""
    from flipscope.data.curation import curate
    from flipscope.data.flipbank import load_flipbank, save_flipbank
    from flipscope.data.store import iter_rows, read_header
    from flipscope.experiments.evaluation import questions_fingerprint
    from flipscope.organism.bank import DEFAULT_RULES

    path, questions = run.found["eval_path"], run.found["questions"]
    digest = questions_fingerprint(questions)
    bank = curate(iter_rows(path), questions, DEFAULT_RULES, source=read_header(path), questions_sha256=digest)
    run.found["bank_path"] = save_flipbank(bank, run.work / "flipbank.json")
    run.found["bank"] = load_flipbank(run.found["bank_path"])


def _discover(run: _Run) -> None:
    """Discovery on pair activations at every layer (patching reuses them)."""
    from flipscope.experiments.discovery import discover
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.model.hook_names import resid_post

    vlm, bank = run.vlm, run.found["bank"]
    pairs = collect_pairs(vlm, bank, [resid_post(i) for i in range(vlm.n_layers)], progress=run.progress)
    found = discover(
        vlm, run.sae, bank, pairs=pairs, exact_top=run.cfg.exact_top, seed=run.cfg.seed, progress=run.progress
    )
    found.save(run.work / "discovery.json")
    chosen, chosen_by = _patched(found, run.cfg.top_k)
    run.found.update(pairs=pairs, discovery=found, chosen=chosen, chosen_by=chosen_by, clamp_feature=_clamped(found))


def _patched(found: Any, top_k: int) -> tuple[list[int], str]:
    """The features to patch: the first framing features, else the first by attribution; and how chosen."""
    chosen = found.framing_features(top_k)
    if chosen:
        return chosen, "framing specificity"
    chosen = [int(f) for f in found.top(top_k, by="attribution")["feature"]]
    return chosen, "attribution (no feature carries the wording beyond the null)"


def _clamped(found: Any) -> int:
    """The feature to clamp: the first framing feature the wording switches on, else the first
    by attribution that the flips switch on."""
    table = found.table
    if "label" in table:
        on = table[table["label"].isin(["framing", "framing + readout"]) & (table["framing_shift"] > 0)]
        if len(on):
            return int(on.sort_values("rank_framing")["feature"].iloc[0])
    ranked = table.sort_values("rank_attribution")
    return int(ranked[ranked["mean_delta_flip"] > 0]["feature"].iloc[0])


def _layers(run: _Run) -> list[int]:
    """The layers the sweep and the trace look at: every `layer_stride`-th, and the last."""
    n = run.vlm.n_layers
    return sorted({*range(0, n, run.cfg.layer_stride), n - 1})


def _replicate(run: _Run) -> None:
    """Held-out replication: features chosen on one half of the FlipBank, patched on the other."""
    from flipscope.experiments.replication import replicate

    cfg = run.cfg
    run.found["replication"] = replicate(
        run.vlm, run.sae, run.found["bank"], top_k=cfg.top_k, seed=cfg.seed, progress=run.progress
    )
    write_json(run.work / "replication.json", run.found["replication"])


def _base_text(run: _Run) -> None:
    """An organism on a real base: the same analysis on the base model, reports as evidence."""
    from flipscope.reporting.demo_base import base_text_analysis

    cfg = run.cfg
    run.found["base_text"] = base_text_analysis(
        run.card, run.sae, run.work / "base", n_films=cfg.n_films, top_k=cfg.top_k, seed=cfg.seed,
        progress=run.progress,
    )  # fmt: skip


def _patch(run: _Run) -> None:
    """The discovered features, the card's planted set, the clamped feature alone (each with the
    non-flips judged against their own framing words' effect), and every layer."""
    from flipscope.data.store import read_rows
    from flipscope.experiments.control_bound import non_flip_wording
    from flipscope.experiments.patching import patch_bank
    from flipscope.experiments.sweeps import layer_sweep

    f, vlm, sae = run.found, run.vlm, run.sae
    bank, pairs, progress = f["bank"], f["pairs"], run.progress
    f["wording"] = wording = non_flip_wording(vlm, bank)
    f["planted"] = [x["feature"] for x in run.card["framing_features"] if x["aligned"]]
    sets = {"patch_discovered": f["chosen"], "patch_card": f["planted"], "patch_single": [f["clamp_feature"]]}
    sets = {name: features for name, features in sets.items() if features}  # a card may mark none
    done: dict[tuple[int, ...], Any] = {}  # discovery may find exactly the card's set: patched once
    for name, features in sets.items():
        key = tuple(features)
        if key not in done:
            done[key] = patch_bank(vlm, sae, bank, features, pairs=pairs, wording=wording, progress=progress)
        f[name] = done[key]
    f["count"] = _count(run, sae, f["discovery"], pairs, "count_main.jsonl")
    layers = layer_sweep(vlm, bank, run.work / "layer_sweep.jsonl", layers=_layers(run), pairs=pairs, progress=progress)
    f["layer_rows"] = read_rows(layers.path)
    for name in sets:
        result = f[name]
        write_json(run.work / f"{name}.json", {"summary": result.summary, "cases": result.rows}, indent=None)


def _trace(run: _Run) -> None:
    """Where the framing enters (its words corrupted, the clean run restored), and by which heads."""
    from flipscope.experiments.heads import heads_before_entry
    from flipscope.experiments.upstream import trace_framing

    cfg, bank, progress = run.cfg, run.found["bank"], run.progress
    traced = trace_framing(run.vlm, bank, layers=_layers(run), max_cases=cfg.trace_cases, progress=progress)
    run.found["upstream"] = up = traced.summary(seed=cfg.seed)
    up["heads"] = heads_before_entry(run.vlm, bank, up, max_cases=cfg.trace_cases, seed=cfg.seed, progress=progress)
    write_json(run.work / "trace.json", up)


def _site(run: _Run) -> None:
    """The logit lens over the pairs discovery collected, then discovery and patching again at the
    organism's SAE nearest where the trace says the framing enters (`flipscope.experiments.sites`),
    when that is not the main SAE's site."""
    from flipscope.errors import FlipscopeError
    from flipscope.experiments.discovery import discover
    from flipscope.experiments.lens import lens_trajectory
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.patching import patch_bank
    from flipscope.experiments.sites import choose_site, folder_candidates
    from flipscope.sae.load import load_sae

    f, cfg = run.found, run.cfg
    lens = lens_trajectory(run.vlm, f["bank"], pairs=f["pairs"], progress=run.progress)
    f["lens"] = lens.summary(seed=cfg.seed)
    write_json(run.work / "lens.json", f["lens"])
    f["dashboards"] = {"main": _dashboard(run, run.sae, f["chosen"])}
    try:
        choice = choose_site(folder_candidates(run.directory), f["upstream"], run.vlm.n_layers)
    except FlipscopeError as err:
        f["site"] = {"choice": None, "why": str(err)}
        return
    f["site"] = {"choice": choice.to_dict()}
    if choice.chosen.hook == run.card["hook_name"]:
        return
    sae = load_sae(choice.chosen.source)
    pairs = collect_pairs(run.vlm, f["bank"], [choice.chosen.hook], progress=run.progress)
    found = discover(run.vlm, sae, f["bank"], layers=[], pairs=pairs, exact_top=0, seed=cfg.seed, progress=run.progress)
    found.save(run.work / "site_discovery.json")
    chosen, chosen_by = _patched(found, cfg.top_k)
    result = patch_bank(run.vlm, sae, f["bank"], chosen, pairs=pairs, wording=f["wording"], progress=run.progress)
    write_json(run.work / "site_patch.json", {"summary": result.summary, "cases": result.rows}, indent=None)
    count = _count(run, sae, found, pairs, "count_entry.jsonl")
    f["site"].update(discovery=found, chosen=chosen, chosen_by=chosen_by, patch=result, count=count)
    f["dashboards"]["entry"] = _dashboard(run, sae, chosen)


def _dashboard(run: _Run, sae: Any, features: list[int]) -> dict[str, Any]:
    """Where the patched features fire on the bank's prompts (`flipscope.experiments.dashboard`)."""
    from flipscope.experiments.dashboard import feature_dashboard

    return feature_dashboard(run.vlm, sae, run.found["bank"], features, progress=run.progress)


def _count(run: _Run, sae: Any, found: Any, pairs: Any, name: str) -> dict[str, Any]:
    """How many of discovery's first `count_top` features (as `_patched` chooses them) undo the flips
    at `sae`'s site, and what ranked them."""
    from flipscope.experiments.feature_count import count_features

    features, chosen_by = _patched(found, run.cfg.count_top)
    counted = count_features(
        run.vlm, sae, run.found["bank"], features, run.work / name, pairs=pairs, seed=run.cfg.seed,
        progress=run.progress,
    )  # fmt: skip
    return {**counted, "ranked_by": "framing specificity" if chosen_by == "framing specificity" else "attribution"}


def _clamp(run: _Run) -> None:
    """The clamped feature's curve, beside the DiffMean direction and the trace's heads ablated."""
    import torch

    from flipscope.experiments.clamping import compare_clamped
    from flipscope.experiments.evaluation import EvalConfig
    from flipscope.experiments.heads import carrier_ablations
    from flipscope.interventions.edited import DirectionAblatedVLM

    f, cfg = run.found, run.cfg
    direction = torch.tensor(f["discovery"].diffmean["direction"])
    ablated = DirectionAblatedVLM(run.vlm, run.card["hook_name"], direction, name="DiffMean")
    clamps = [{f["clamp_feature"]: v} for v in cfg.clamp_values]
    f["clamping"] = compare_clamped(
        run.vlm, run.sae, f["questions"], clamps, run.work / "clamp", EvalConfig(conditions=cfg.conditions),
        also={"diffmean": ablated, **carrier_ablations(run.vlm, f["upstream"]["heads"], f["questions"])},
        baseline_store=f["eval_path"], progress=run.progress,
    )  # fmt: skip
    write_json(run.work / "clamp.json", f["clamping"])


def _activations(run: _Run) -> None:
    """The patched features' activation per question family."""
    from flipscope.experiments.directions import activation_by_family

    f = run.found
    f["cells"] = activation_by_family(run.vlm, run.sae, f["questions"], f["chosen"], seed=run.cfg.seed)


def _figures(run: _Run) -> None:
    """The summary every figure and the report are drawn from, and the figures."""
    from flipscope.reporting.commands import demo_commands, evaluation_commands
    from flipscope.reporting.files import save_figures

    run.found["summary"] = summary = demo_summary(run)
    run.found["figures"] = build_figures(summary)
    written = save_figures(run.found["figures"], run.out, {"demo": summary["settings"]}, png=run.png)
    if written["png_skipped"]:
        run.echo(f"PNGs skipped: {written['png_skipped']}; the HTML figures are written")
    summary["figures"] = {"html": [p.name for p in written["html"]], "png": [p.name for p in written["png"]]}
    summary["png_skipped"] = written["png_skipped"]
    f = run.found
    if has_flips(run):
        counted = {"main": f["count"]["features"], "entry": f["site"].get("count", {}).get("features")}
        summary["commands"] = demo_commands(
            run.directory, f["questions_path"], run.work, f["bank_path"], f["chosen"], f["planted"],
            f["clamp_feature"], run.cfg, counted, f["upstream"],
        )  # fmt: skip
    else:
        summary["commands"] = evaluation_commands(run.directory, f["questions_path"], run.work, run.cfg)


def _report(run: _Run) -> None:
    from flipscope.reporting.dashboard_page import write_dashboard_page
    from flipscope.reporting.report import write_report

    for site, found in run.found.get("dashboards", {}).items():
        write_dashboard_page(run.out / f"dashboard_{site}.html", found, Path(run.found["bank_path"]).name)
    write_report(run.out / "report.html", run.found["summary"], run.found["figures"])


STAGES: tuple[tuple[str, Callable[[_Run], None]], ...] = (
    ("evaluating held-out films", _evaluate),
    ("curating the FlipBank", _curate),
    ("discovering features", _discover),
    ("patching", _patch),
    ("replicating on the held-out half", _replicate),
    ("the base model, text only", _base_text),
    ("tracing where the framing enters", _trace),
    ("the lens, and the SAE where the framing enters", _site),
    ("clamping feature {clamp_feature}", _clamp),
    ("reading feature activations", _activations),
    ("writing figures", _figures),
    ("writing the report", _report),
)
# The stages that explain flips: a model that made none skips them, and its report says so.
FLIP_STAGES = frozenset({_discover, _patch, _replicate, _base_text, _trace, _site, _clamp, _activations})


def run_demo(
    out: str | Path = "figures",
    work: str | Path | None = None,
    *,
    organism: str | Path | None = None,
    cfg: DemoConfig | None = None,
    n_films: int | None = None,
    png: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage of `STAGES` on the organism; write figures, `summary.json` and
    `report.html` to `out` and the stages' stores to `work` (default `out/work`). Returns the summary.

    `cfg` defaults to `DemoConfig.for_organism(card)` (with `n_films` if given).

    Raises:
        FlipscopeError: the organism cannot be loaded, or a stage finds bad input.
    """
    from flipscope.organism import load_organism, organism_dir

    out = Path(out)
    total = time.perf_counter()
    directory = organism_dir(organism)
    vlm, sae, card = load_organism(directory)  # before anything is written: a bad organism leaves no folder
    cfg = cfg if cfg is not None else DemoConfig.for_organism(card, n_films=n_films)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work) if work is not None else out / "work"
    run = _Run(cfg, out, work, directory, vlm, sae, card, progress, png, echo)
    records = StageRecords(work, demo_inputs(vlm, sae, card, cfg))
    seconds: dict[str, float] = {}
    saved: dict[str, float | None] = {}  # the stages read back: what computing them took
    stages = [(name, stage) for name, stage in STAGES if stage is not _base_text or card["config"].get("base")]
    k = 0
    while k < len(stages):
        name, stage = stages[k]
        k += 1
        label = name.format(**run.found)
        echo(f"[{k}/{len(stages)}] {label} ...")
        start = time.perf_counter()
        if stage in (_figures, _report):
            stage(run)
        elif records.run(k, stage, run):
            saved[label] = records.seconds[k]
            echo(f"    finished before: read back from {records.path(k, stage)}")
        seconds[label] = round(time.perf_counter() - start, 2)
        if stage is _curate and not has_flips(run):
            echo(f"no flips on {cfg.n_films} films: nothing for discovery, patching, tracing or clamping to explain")
            stages = [s for s in stages if s[1] not in FLIP_STAGES]
    summary = run.found["summary"]
    summary["seconds"] = {**seconds, "total": round(time.perf_counter() - total, 2)}
    if saved:
        summary["seconds_read_back"] = saved
    write_json(out / "summary.json", summary, default=str)
    echo(f"report: {out / 'report.html'}  ({summary['seconds']['total']:.0f} s)")
    return summary
