"""`flipscope guard calibrate` and `flipscope guard report`: flag flip-prone and image-unreliant answers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flipscope.cli.common import ADAPTER_HELP, app, one_line_errors, writable
from flipscope.errors import FlipscopeError

guard_app = typer.Typer(help="Calibrate and measure a guard on an evaluation.", no_args_is_help=True)
app.add_typer(guard_app, name="guard")


def _store(run: Path) -> Path:
    from flipscope.data.store import read_header

    store = run / "results.jsonl" if run.is_dir() else run
    config = read_header(store).get("eval_config", {})
    if "swap" not in config.get("conditions", []) or config.get("swap_match") != "opposite":
        raise FlipscopeError(
            f"{store} was not evaluated with opposite-label films; the guard's image label needs "
            "`flipscope evaluate --conditions image,blank,swap --swap-match opposite`"
        )
    return store


@guard_app.command("calibrate")
def calibrate(
    run: Path = typer.Argument(..., help="An evaluation (image, blank and an opposite-label swap) to calibrate on."),
    model: str | None = typer.Option(None, help="The model it evaluated, for the hidden-state probe (omit: no probe)."),
    questions: Path | None = typer.Option(None, help="Its questions JSONL (needed with --model)."),
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    adapter: Path | None = typer.Option(None, help=ADAPTER_HELP),
    recall: float = typer.Option(0.9, help="The recall each gate is calibrated for."),
    seed: int = typer.Option(0, help="Seed of the calibration / held-out split and the paraphrase halves."),
    out: Path | None = typer.Option(None, help="Where guard.json goes (default: RUN/guard.json)."),
) -> None:
    """Fit the guard's gates on half of the questions and measure every detector on the other half."""
    from flipscope.data.atomic import write_json
    from flipscope.data.store import iter_rows, read_header
    from flipscope.experiments.detectors import probe_features, question_arrays
    from flipscope.experiments.guard import guard_sentences, guard_study

    with one_line_errors():
        store = _store(run)
        target = out or store.parent / "guard.json"
        writable(target, folder=False)
        if model is not None and questions is None:
            raise FlipscopeError("--model needs --questions (the probe reads each question's original with its film)")
        arrays = question_arrays(iter_rows(store), seed=seed)
        features, hook = None, None
        if model is not None:
            from flipscope.cli.common import load_any_model
            from flipscope.data.questions import load_questions

            vlm = load_any_model(model, "float32", "cpu", adapter=adapter)
            hook = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
            features = probe_features(vlm, load_questions(questions, images), arrays["id"], hook=hook)
        study = guard_study(arrays, features, recall=recall, seed=seed, probe_hook=hook)
        study["source"] = read_header(store)
        write_json(target, study)
    for sentence in guard_sentences(study, store.parent.name):
        typer.echo(sentence)
    typer.echo(f"guard: {target}")


@guard_app.command("report")
def report(
    guards: list[Path] = typer.Argument(..., help="guard.json files (or the folders that hold them)."),
    names: str | None = typer.Option(None, help="Comma-separated labels (default: each run's folder name)."),
    out: Path = typer.Option(Path("guard"), help="Folder for guard.html and its figures."),
    png: bool = typer.Option(True, help="Also render PNGs (needs Chromium; skipped with a message if absent)."),
) -> None:
    """The detector × target AUROC table with CIs, the gates' held-out recall and the abstention curve."""
    from flipscope.experiments.guard import guard_sentences
    from flipscope.reporting.files import save_figures
    from flipscope.reporting.guard_report import guard_figures, write_guard_report

    with one_line_errors():
        writable(out, folder=True)
        paths = [g / "guard.json" if g.is_dir() else g for g in guards]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FlipscopeError(f"no guard.json at {missing[0]}; run `flipscope guard calibrate RUN` first")
        labels = [n.strip() for n in names.split(",")] if names else [p.parent.name for p in paths]
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise FlipscopeError(f"names {labels} must be unique, one per guard")
        studies = {label: json.loads(p.read_text()) for label, p in zip(labels, paths, strict=True)}
        figures = guard_figures(studies)
        written = save_figures(figures, out, png=png)
        page = write_guard_report(out / "guard.html", studies, figures, labels)
    for label in labels:
        for sentence in guard_sentences(studies[label], label):
            typer.echo(sentence)
    if written["png_skipped"]:
        typer.echo(f"PNGs skipped: {written['png_skipped']}")
    typer.echo(f"report: {page}")
