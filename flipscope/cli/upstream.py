"""`flipscope trace`: where along the depth and the prompt the framing enters."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flipscope.cli.common import ADAPTER_HELP, app, fmt, ints, load_model, one_line_errors, writable
from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.reporting.claims import framing_entry


@app.command()
def trace(
    flipbank: Path = typer.Option(..., help="FlipBank JSON (e.g. flipbank/organism/flipbank.json)."),
    model: str | None = typer.Option(None, help="Model that made the FlipBank (default: the shipped organism)."),
    layers: str | None = typer.Option(None, help="Layers to restore, e.g. 0,8,17 (default: all)."),
    max_cases: int = typer.Option(64, help="Flips traced (the bank's first ones); 0 for all."),
    batch_size: int = typer.Option(16, help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, help="Output JSON (default: <flipbank>.trace.json beside the FlipBank)."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device: cpu, cuda, ..."),
    adapter: Path | None = typer.Option(None, help=ADAPTER_HELP),
) -> None:
    """Corrupt each flip's framing words and restore the clean run layer by layer, position group by
    group: where the framing enters, and which words carry it."""
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.upstream import trace_framing

    with one_line_errors():
        path = writable(out or flipbank.with_name(f"{flipbank.stem}.trace.json"), folder=False)
        bank = load_flipbank(flipbank)
        vlm = load_model(model, dtype, device, adapter)
        layer_ids = ints(layers, "--layers") if layers else None
        bad = [layer for layer in layer_ids or [] if not 0 <= layer < vlm.n_layers]
        if bad:
            raise FlipscopeError(f"--layers {bad}: the model has layers 0..{vlm.n_layers - 1}")
        traced = trace_framing(vlm, bank, layers=layer_ids, max_cases=max_cases or None, batch_size=batch_size)
        summary = traced.summary()
        write_json(path, summary)
    typer.echo(f"{summary['n_cases']} flips traced; skipped: {json.dumps(summary['skipped'])}")
    groups = summary["groups"]
    typer.echo(f"{'layer':>5}  " + "".join(f"{g:>26}" for g in groups))
    for row in summary["profile"]:
        typer.echo(f"{row['layer']:>5}  " + "".join(f"{fmt(row[g]):>26}" for g in groups))
    for word, estimate in list(summary["words"].items())[:8]:
        typer.echo(f"  corrupting '{word}' alone undoes {fmt(estimate)} of the margin shift")
    typer.echo(framing_entry(summary))
    typer.echo(f"trace: {path}")
