"""The options many commands share, each declared once in Typer's `Annotated` form, so a command
writes `dtype: Dtype = "float32"` and every command's help says the same thing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipscope.cli.common import ADAPTER_HELP, SITE_HELP, TRACE_HELP

__all__ = ["Adapter", "BankModel", "Device", "Dtype", "Flipbank", "OrganismDir", "SaeId", "Saes", "SiteSae", "Trace"]

Adapter = Annotated[Path | None, typer.Option(help=ADAPTER_HELP)]
Dtype = Annotated[str, typer.Option(help="Model dtype: float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="Device: cpu, cuda, ...")]
Flipbank = Annotated[Path, typer.Option(help="FlipBank JSON (e.g. flipbank/organism/flipbank.json).")]
BankModel = Annotated[str | None, typer.Option(help="Model that made the FlipBank (default: the shipped organism).")]
SiteSae = Annotated[
    str | None,
    typer.Option(help="SAE folder, sae-lens release, or auto (as discover --sae auto) (default: MODEL/sae)."),
]
SaeId = Annotated[str | None, typer.Option(help="SAE id within a sae-lens release.")]
Saes = Annotated[str | None, typer.Option(help=SITE_HELP)]
Trace = Annotated[Path | None, typer.Option(help=TRACE_HELP)]
OrganismDir = Annotated[
    Path | None,
    typer.Option(help="Organism directory, or a shipped organism's name (default, gemma3-270m; default: default)."),
]
