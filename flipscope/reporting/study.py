"""The false-reliability-trap study on the organism: five configurations (the organism as trained and
its four shipped LoRA fine-tunes) × two sites (the films it was trained on, and the same patients
filmed in a second style), each evaluated as a user's run would be, then compared with
`flipscope compare` — flip rate against the Dangerous share across the ten runs, and per run whether
a confidence screen or one text-only forward finds the Dangerous answers.

Every run is a resumable evaluation store under `OUT/work/`, so a rerun computes only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json
from flipscope.data.questions import load_questions
from flipscope.experiments.compare import compare_runs
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.model.hooked import HookedVLM
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.films import SITES
from flipscope.organism.finetune import FINETUNES, default_adapters_dir
from flipscope.organism.questions import export_questions
from flipscope.reporting.compare_plots import comparison_figures
from flipscope.reporting.compare_report import write_compare_report
from flipscope.reporting.files import save_figures

__all__ = ["CONFIGURATIONS", "run_study"]

CONFIGURATIONS: tuple[str, ...] = ("organism", *(ft.name for ft in FINETUNES))


def run_study(
    out: str | Path,
    *,
    organism: str | Path | None = None,
    adapters: str | Path | None = None,
    n_films: int = 40,
    png: bool = True,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate every configuration on both sites and compare the runs; returns the comparison (as
    written to `OUT/compare.json`, beside the figures and `OUT/compare.html`)."""
    out = Path(out)
    work = out / "work"
    organism_dir = Path(organism) if organism is not None else default_organism_dir()
    adapter_dir = Path(adapters) if adapters is not None else default_adapters_dir()
    cfg = OrganismConfig.from_dict(load_card(organism_dir)["config"])
    questions = {}
    for site in SITES:
        path = work / "data" / site / "questions.jsonl"
        if not path.is_file():
            export_questions(cfg, path.parent, n_films, site)
        questions[site] = load_questions(path)
    runs = []
    for config in CONFIGURATIONS:
        adapter = None if config == "organism" else adapter_dir / config
        vlm = HookedVLM.from_pretrained(organism_dir, adapter=adapter)
        for site in SITES:
            store = work / f"{config}-{site}" / "results.jsonl"
            run_sweep(vlm, questions[site], EvalConfig(), store, progress=False)
            runs.append(store.parent)
        echo(f"evaluated {config} on {', '.join(SITES)}")
    comparison = compare_runs(runs, questions="own").to_dict()
    write_json(out / "compare.json", comparison)
    figures = comparison_figures(comparison)
    written = save_figures(figures, out, png=png)
    comparison["png_skipped"] = written["png_skipped"]
    write_compare_report(out / "compare.html", comparison, figures)
    return comparison
