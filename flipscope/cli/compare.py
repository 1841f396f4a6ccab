"""`flipscope compare`: the false-reliability trap across evaluation runs."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import app, fmt, one_line_errors, writable
from flipscope.data.atomic import write_json
from flipscope.reporting.format import num


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Output folders of `flipscope evaluate` (or their results.jsonl)."),
    names: str | None = typer.Option(None, help="Comma-separated run labels (default: the folder names)."),
    questions: str = typer.Option(
        "same",
        help="same: refuse runs whose questions differ; shared: compare on the questions all runs have; "
        "own: each run on its own questions (paired tests on those a pair shares).",
    ),
    reliance: str | None = typer.Option(
        None, help="Condition that counts as 'image removed' (default: blank, else none)."
    ),
    out: Path = typer.Option(Path("compare"), help="Folder for compare.json, the figures and compare.html."),
    png: bool = typer.Option(True, help="Also render PNGs (needs Chromium; skipped with a message if absent)."),
) -> None:
    """Flip rate, accuracy, quadrants and confidence screening per run; flip rate against the Dangerous
    share across runs; paired tests between runs on the same questions; figures and a report page."""
    from flipscope.experiments.compare import compare_runs
    from flipscope.reporting.compare_plots import comparison_figures
    from flipscope.reporting.compare_report import (
        correlation_sentence,
        paired_sentence,
        screening_sentence,
        unavailable_sentence,
        write_compare_report,
    )
    from flipscope.reporting.files import save_figures

    with one_line_errors():
        writable(out, folder=True)
        labels = [n.strip() for n in names.split(",")] if names else None
        found = compare_runs(runs, names=labels, questions=questions, removed=reliance).to_dict()
        write_json(out / "compare.json", found)
        figures = comparison_figures(found)
        written = save_figures(figures, out, png=png)
        report = write_compare_report(out / "compare.html", found, figures)
    for name in found["names"]:
        t = found["runs"][name]
        shares = ", ".join(f"{q} {num(b['share']['value'], '.2f')}" for q, b in t["quadrants"].items())
        typer.echo(
            f"{name}: {t['n_questions']} questions; flip rate {fmt(t['flip_rate'])}; accuracy {fmt(t['accuracy'])}; "
            f"yes-rate {fmt(t['yes_rate'])}"
        )
        if t["quadrants_available"]:
            typer.echo(f"  text-only agreement {fmt(t['text_only_agreement'])}; {shares}")
        families = "; ".join(f"{f} {fmt(b)}" for f, b in t["by_strategy"].items())
        typer.echo(f"  flip rate by family: {families}")
    if missing := unavailable_sentence(found):
        typer.echo(missing)
    typer.echo(correlation_sentence(found["correlation"]))
    for name in found["names"]:
        typer.echo(screening_sentence(name, found["runs"][name].get("screening")))
    for test in found["paired"]:
        d = test["dangerous"]
        dangerous = f" Dangerous: {d['only_first']}/{d['only_second']} discordant (McNemar p {num(d['p'], '.3g')})."
        typer.echo(paired_sentence(test) + (dangerous if d["n"] else ""))
    if written["png_skipped"]:
        typer.echo(f"PNGs skipped: {written['png_skipped']}")
    typer.echo(f"results: {out / 'compare.json'}\nreport: {report}")
