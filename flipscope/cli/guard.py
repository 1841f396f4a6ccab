"""`flipscope guard calibrate`, `report` and `answer`: flag flip-prone and image-unreliant answers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from flipscope.cli.common import app, one_line_errors, writable
from flipscope.cli.options import Adapter, Device
from flipscope.errors import FlipscopeError

guard_app = typer.Typer(
    help="Calibrate a guard on an evaluation, measure it, and answer new questions through it.", no_args_is_help=True
)
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
    adapter: Adapter = None,
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


@guard_app.command("answer")
def answer(
    questions: Path = typer.Argument(..., help="Questions JSONL to answer: every wording of each, with its film."),
    guard: Path = typer.Option(..., help="guard.json from `flipscope guard calibrate` (or the folder that holds it)."),
    reference: Path = typer.Option(
        ..., help="The questions JSONL the guard was calibrated on: its calibration films are the reference films."
    ),
    out: Path = typer.Option(..., help="Folder for answers.jsonl (resumable) and summary.json."),
    model: str | None = typer.Option(None, help="The model the guard was calibrated on (default: the organism)."),
    images: Path | None = typer.Option(None, help="Directory for QUESTIONS' relative image paths."),
    reference_images: Path | None = typer.Option(None, help="Directory for REFERENCE's relative image paths."),
    image_check: str = typer.Option("opposite", help="opposite (a reference film of the other label), blank or off."),
    gates: str = typer.Option(
        "margin,probe", help="The flip-prone gates that flag (either suffices): margin, probe, or both."
    ),
    batch_size: int = typer.Option(32, min=1, help="Prompts per forward pass."),
    adapter: Adapter = None,
    device: Device = "cpu",
) -> None:
    """Answer every wording of QUESTIONS through the calibrated guard: each answer with its flags and
    whether to abstain; where the truth is known, what the flags caught."""
    from flipscope.cli.common import load_model
    from flipscope.data.atomic import file_sha256, write_json
    from flipscope.data.questions import load_questions
    from flipscope.experiments.evaluation import questions_fingerprint
    from flipscope.experiments.guard_run import guard_run, guard_run_summary
    from flipscope.interventions.guarded import GuardedVLM, reference_films

    with one_line_errors():
        writable(out, folder=True)
        path = guard / "guard.json" if guard.is_dir() else guard
        study = _study(path)
        asked = load_questions(questions, images)
        refs = load_questions(reference, reference_images)
        if questions_fingerprint(refs) != study["source"]["questions"]["sha256"]:
            raise FlipscopeError(f"--reference {str(reference)!r} is not the questions {str(path)!r} was calibrated on")
        vlm = load_model(model, "float32", device, adapter)
        identity, calibrated = vlm.identity(), study["source"]["model"]["fingerprint"]
        if identity["fingerprint"] != calibrated:
            raise FlipscopeError(f"{str(path)!r} was calibrated on another model (fingerprint {calibrated})")
        ids = set(study["calibration_ids"])
        chosen, config = _config(study, path, gates, image_check)
        guarded = GuardedVLM(vlm, config, reference_films([q for q in refs if q.id in ids]))
        header = {"model": identity, "guard": file_sha256(path), "image_check": image_check, "gates": chosen,
                  "questions": {"n": len(asked), "sha256": questions_fingerprint(asked)},
                  "path": "suffix"}  # fmt: skip
        store = guard_run(guarded, asked, out / "answers.jsonl", header, batch_size=batch_size)
        summary = {**guard_run_summary(store), "calibration_overlap": sum(q.id in ids for q in asked)}
        write_json(out / "summary.json", summary)
    _print_run(summary)
    typer.echo(f"answers: {store}\nsummary: {out / 'summary.json'}")


def _config(study: dict, path: Path, gates: str, image_check: str):
    """The flip-prone gates `--gates` names, as the study calibrated them, and the image check."""
    from flipscope.interventions.guarded import GuardConfig

    chosen = sorted({g.strip() for g in gates.split(",") if g.strip()})
    if not chosen or not set(chosen) <= {"margin", "probe"}:
        raise FlipscopeError(f"--gates {gates!r}: expected margin, probe or margin,probe")
    config = GuardConfig.from_study(study, image_check=image_check, probe="probe" in chosen)
    if "probe" in chosen and config.probe is None:
        raise FlipscopeError(f"{str(path)!r} has no probe gate (calibrate with --model); use --gates margin")
    return chosen, config if "margin" in chosen else dataclasses.replace(config, abs_margin=None)


def _study(path: Path) -> dict:
    """guard.json, checked for what answering needs."""
    from flipscope.data.jsonfile import read_json_object

    study = read_json_object(path, "guard from `flipscope guard calibrate`")
    for field in ("thresholds", "calibration_ids", "source"):
        if field not in study:
            raise FlipscopeError(f"guard {str(path)!r} has no {field!r}; write it with `flipscope guard calibrate`")
    return study


def _print_run(s: dict) -> None:
    from flipscope.reporting.format import fmt

    def show(estimate) -> str:
        return "n/a (none)" if estimate is None else fmt(estimate)

    typer.echo(f"{s['n_answers']} answers to {s['n_questions']} questions (95% bootstrap CIs over questions)")
    typer.echo(f"  abstained on            {show(s['abstained'])}")
    typer.echo(f"  accuracy, kept answers  {show(s['accuracy_kept'])}")
    typer.echo(f"  accuracy, held answers  {show(s['accuracy_held'])}")
    typer.echo(f"  flip-prone questions    {show(s['flip_prone_questions'])}")
    typer.echo(f"  flagged flip-prone: of the flip-prone {show(s['flagged_flip_prone'])}, of the stable "
               f"{show(s['flagged_stable'])}")  # fmt: skip
    if s["image_check_unknown"]:
        typer.echo(
            f"  {s['image_check_unknown']} answers had no reference film of the other label: image reliance unknown"
        )
    if s["calibration_overlap"]:
        typer.echo(f"  {s['calibration_overlap']} of these questions calibrated the guard: on them its measures are "
                   "in-sample")  # fmt: skip
