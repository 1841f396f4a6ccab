"""`flipscope convert` and `flipscope import-answers`: the field's own data in."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import app, one_line_errors, writable
from flipscope.errors import FlipscopeError


def _mapping(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise FlipscopeError(f"--map {pair!r}: expected FIELD=COLUMN (e.g. question_id=study_id+baseline_question)")
        out[field.strip()] = column.strip()
    return out


@app.command()
def convert(
    source: Path = typer.Argument(
        ..., help="PSF-Med records: JSON, JSONL, CSV or Parquet, or a folder a datasets table was saved to."
    ),
    out: Path = typer.Option(..., help="The flipscope questions JSONL to write."),
    images: Path = typer.Option(
        ..., help="Root the images are found under (by filename, image_path, image_id or the MIMIC layout)."
    ),
    yesno: str = typer.Option(
        "off",
        help="Keep questions and paraphrases the release flags as yes/no: regex, claude, both, either (any), off.",
    ),
) -> None:
    """Convert PSF-Med (nested records or pair rows) into a questions file `evaluate` reads: phenomena
    become paraphrase families, answer-inverting paraphrases (op_match false) keep their relation, and
    every bad record and missing image is listed before anything is written."""
    from flipscope.data.psfmed import psfmed_rows, read_records, resolve_images, write_questions

    with one_line_errors():
        writable(out, folder=False)
        rows = resolve_images(psfmed_rows(read_records(source), yesno=yesno), images)
        path = write_questions(rows, out)
    n_para = sum(len(r["paraphrases"]) for r in rows)
    n_inverted = sum(r["relations"].count("inverted") for r in rows)
    families = sorted({s for r in rows for s in r["strategies"]})
    typer.echo(f"{len(rows)} questions, {n_para} paraphrases ({n_inverted} answer-inverting): {path}")
    typer.echo(f"paraphrase families: {', '.join(families)}")


@app.command("import-answers")
def import_answers(
    table: Path = typer.Argument(..., help="An answer table: CSV, JSONL, JSON or Parquet, one row per wording."),
    out: Path = typer.Option(
        ..., help="Folder for results.jsonl (one subfolder per model when the table has a model column)."
    ),
    map_: list[str] | None = typer.Option(
        None,
        "--map",
        help="FIELD=COLUMN, repeatable: question_id, variant, original, wording, answer, generated, margin, p_yes, "
        "condition, truth, finding, strategy, relation, model (question_id may join columns with '+'). The lab's "
        "layout (study_id, baseline_question, variant_index, question, extracted_answer...) needs none.",
    ),
    model: str | None = typer.Option(None, help="The model's name, when the table has no model column."),
    swap_match: str = typer.Option(
        "any", help="What the table's swap rows showed: any other film, or opposite (same finding, other truth)."
    ),
) -> None:
    """Read answers from a model nobody can hook (an API model's table) into an evaluation store that
    summarize, compare and the report read like any run."""
    from flipscope.cli.evaluation import _write_summary
    from flipscope.data.imported import import_answers as run_import
    from flipscope.data.store import read_header

    with one_line_errors():
        writable(out, folder=True)
        written = run_import(table, out, _mapping(map_), model=model, swap_match=swap_match)
    for name, store in written.items():
        header = read_header(store)
        imported = header["imported"]
        typer.echo(f"{name}: answers under {', '.join(header['eval_config']['conditions'])}")
        if imported["deduplicated"]:
            typer.echo(f"  {imported['deduplicated']} repeated identical wording(s) kept once, with a count")
        for reason, n in imported["excluded"].items():
            typer.echo(f"  left out: {n} {reason}")
        _write_summary(store, store.parent)
