"""`flipscope evidence`: where in the film each wording's answer comes from, for a FlipBank's cases."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import app, fmt, load_model, one_line_errors, writable
from flipscope.cli.options import Adapter, BankModel, Device, Dtype


@app.command()
def evidence(
    flipbank: Path | None = typer.Option(None, help="FlipBank JSON (e.g. flipbank/organism/flipbank.json)."),
    run: Path | None = typer.Option(
        None, help="Instead: an evaluation (image and blank) whose shares are read from its margins, no model."
    ),
    model: BankModel = None,
    max_cases: int = typer.Option(20, min=1, help="Flips mapped (the bank's first ones), and as many controls."),
    pictures: int = typer.Option(4, min=0, help="Flip cases drawn as overlays (original beside paraphrase)."),
    out: Path = typer.Option(..., help="Folder for evidence.json and the overlay figure."),
    png: bool = typer.Option(True, help="Also write the figure as PNG (needs a Chromium)."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Occlusion maps of each case's original and paraphrase on its film: did a flip stop using the
    film (its share of the margin falls) or use it differently (the maps' cosine falls)? With --run,
    the image-evidence share of every answer of an evaluation, by family, quadrant and flip."""
    from flipscope.data.atomic import write_json
    from flipscope.data.flipbank import check_flipbank_model, load_flipbank
    from flipscope.experiments.evidence_pairs import flip_evidence
    from flipscope.reporting.evidence_plots import overlay_figure
    from flipscope.reporting.files import save_figures

    if (flipbank is None) == (run is None):
        raise typer.BadParameter("give exactly one of --flipbank and --run", param_hint="--flipbank/--run")
    if run is not None:
        _run_shares(run, out)
        return
    with one_line_errors():
        writable(out, folder=True)
        bank = load_flipbank(flipbank)
        vlm = load_model(model, dtype, device, adapter)
        check_flipbank_model(bank, vlm)
        found = flip_evidence(vlm, bank, max_cases=max_cases)
        write_json(out / "evidence.json", found, allow_nan=False)
        shown = [r for r in found["cases"] if r["flip"]][:pictures]
        written = (
            save_figures({"overlays": overlay_figure(shown)}, out, {"cases": pictures}, png=png) if shown else None
        )
    for kind, s in found["summary"].items():
        typer.echo(f"{kind} ({s['n']}): map cosine original vs paraphrase {fmt(s['cosine'])}, "
                   f"paraphrase minus original share of the margin from the film {fmt(s['share_change'])}")  # fmt: skip
    flips = found["summary"]["flips"]["share_change"]
    if flips["n"] and flips["high"] < 0:
        typer.echo("Flipping paraphrases draw less of their margin from the film than their originals.")
    elif flips["n"] and flips["low"] > 0:
        typer.echo("Flipping paraphrases draw more of their margin from the film than their originals.")
    else:
        typer.echo(
            "Flipping paraphrases and their originals draw the same share from the film, as the interval stands."
        )
    typer.echo(f"evidence: {out / 'evidence.json'}" + (f"; overlays: {written['html'][0]}" if written else ""))


def _run_shares(run: Path, out: Path) -> None:
    from flipscope.data.atomic import write_json
    from flipscope.experiments.evidence_pairs import run_shares

    with one_line_errors():
        writable(out, folder=True)
        found = run_shares(run / "results.jsonl" if run.is_dir() else run)
        write_json(out / "evidence.json", found, allow_nan=False)
    for name, e in found["by_family"].items():
        typer.echo(f"image-evidence share, {name}: {fmt(e)}")
    for name, e in found["by_quadrant"].items():
        typer.echo(f"image-evidence share of the original, {name}: {fmt(e)}")
    change = found["flip_paraphrase_minus_original"]
    typer.echo(f"flipping paraphrase minus its original: {fmt(change)}")
    typer.echo(f"evidence: {out / 'evidence.json'}")
