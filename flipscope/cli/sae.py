"""Commands on SAEs: `flipscope sae train` gives any model a dictionary at the site a trace names."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import app, load_any_model, model_source, one_line_errors, writable
from flipscope.cli.options import Adapter, Device, Dtype
from flipscope.kernels import prefer_portable

__all__ = ["sae_app"]

sae_app = typer.Typer(help="Train SAEs for any model flipscope loads.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def train(
    hook: str = typer.Option(..., help="Hook to read, e.g. blocks.0.hook_attn_out (see `flipscope hooks MODEL`)."),
    questions: Path = typer.Option(..., help="Questions JSONL whose wordings and evidence make the training prompts."),
    out: Path = typer.Option(..., help="Folder to write the SAE to (sae-lens format, with training.json)."),
    model: str | None = typer.Option(None, help="Hub id or model directory (default: the shipped organism)."),
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    conditions: str = typer.Option("image,blank", help="Prompt conditions: image, blank, none, swap, context."),
    architecture: str = typer.Option("jumprelu", help="jumprelu (GemmaScope 2's) or topk."),
    d_sae: int = typer.Option(256, help="Dictionary size."),
    l0: float = typer.Option(12.0, help="Target mean L0 (jumprelu) or k (topk)."),
    steps: int = typer.Option(2000, help="Optimiser steps."),
    batch: int = typer.Option(512, help="Activations per step."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    held_out: float = typer.Option(0.2, help="Share of the questions held out to measure FVU, L0 and dead share."),
    seed: int = typer.Option(0, help="Seed of the initialisation, batch order and held-out split."),
    family: str | None = typer.Option(None, help="Model family (default: from the checkpoint's config)."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Train an SAE at HOOK on the questions' prompts; report FVU, L0 and dead share on held-out questions."""
    prefer_portable()  # before torch loads: on a CPU the SAE's bits are then any AVX2 CPU's
    from flipscope.data.questions import load_questions
    from flipscope.experiments.site_sae import train_site_sae
    from flipscope.sae.train import SAETrainConfig

    with one_line_errors():
        writable(out, folder=True)
        cfg = SAETrainConfig(
            architecture=architecture, d_sae=d_sae, target_l0=l0, steps=steps, batch=batch, lr=lr,
            held_out=held_out, seed=seed,
        )  # fmt: skip
        loaded = load_questions(questions, images)
        vlm = load_any_model(model_source(model), dtype, device, adapter=adapter, family=family)
        report = train_site_sae(vlm, loaded, hook, out, cfg, conditions=[c.strip() for c in conditions.split(",")])
    held, train_stats = report["held_out"], report["train"]
    typer.echo(
        f"SAE at {hook}: {d_sae} features ({architecture}); held-out questions: FVU {held['fvu']:.3f}, "
        f"L0 {held['l0']:.1f}, dead {held['dead_share']:.1%} ({held['n_tokens']} tokens); "
        f"training: FVU {train_stats['fvu']:.3f}, L0 {train_stats['l0']:.1f}"
    )
    typer.echo(f"SAE: {out} (load with flipscope.sae.load_sae or --sae {out})")
