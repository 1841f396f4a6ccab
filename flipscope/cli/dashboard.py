"""The `dashboard` command: where discovered features fire across a FlipBank's prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flipscope.cli.common import (
    app,
    echo_site,
    load_model_and_site,
    one_line_errors,
    writable,
)
from flipscope.cli.features import DISCOVERY_HELP, feature_request, features_help, resolve_features
from flipscope.cli.options import Adapter, BankModel, Device, Dtype, Flipbank, SaeId, Saes, SiteSae, Trace

Effects = Annotated[
    int,
    typer.Option(
        min=0,
        help="Prompts on which each feature's decoder row is written at the answer position, and the feature "
        "switched off on the question and the tail, each beside random directions of the same norm (0: skip).",
    ),
]


@app.command()
def dashboard(
    flipbank: Flipbank,
    features: str = typer.Option(..., help=features_help("show")),
    discovery: Path | None = typer.Option(
        None, help=DISCOVERY_HELP + " Default: <flipbank>.features.json beside the FlipBank."
    ),
    model: BankModel = None,
    sae: SiteSae = None,
    sae_id: SaeId = None,
    saes: Saes = None,
    trace: Trace = None,
    top: int = typer.Option(12, min=1, help="Top activations and tokens listed per feature."),
    examples: int = typer.Option(3, min=0, help="Flips shaded token by token per feature."),
    logits: int = typer.Option(
        10, min=0, help="Tokens each feature's decoder row raises and lowers most through the unembedding (0: skip)."
    ),
    effects: Effects = 16,
    out: Path | None = typer.Option(None, help="Output folder (default: <flipbank>.dashboard/ beside the FlipBank)."),
    batch_size: int = typer.Option(16, min=1, help="Prompts per forward pass."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Where each feature fires on the FlipBank's prompts (image, header, question, the template's tail,
    the last position) and how the paraphrase moves it where the answer is read; a page with its top
    activations in context and flips shaded token by token."""
    from flipscope.data.atomic import write_json
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.dashboard import feature_dashboard
    from flipscope.reporting.dashboard_page import write_dashboard_page
    from flipscope.reporting.feature_claims import feature_sentence

    out = out or flipbank.with_name(f"{flipbank.stem}.dashboard")
    with one_line_errors():
        writable(out, folder=True)
        request = feature_request(features)
        bank = load_flipbank(flipbank)
        vlm, dictionary, site = load_model_and_site(model, sae, sae_id, saes, trace, bank, dtype, device, adapter)
        chosen = resolve_features(
            request, discovery or flipbank.with_name(f"{flipbank.stem}.features.json"), dictionary
        )
        found = feature_dashboard(
            vlm,
            dictionary,
            bank,
            chosen,
            top=top,
            examples=examples,
            logits=logits,
            effects=effects,
            batch_size=batch_size,
        )
        write_json(out / "dashboard.json", found)
        page = write_dashboard_page(out / "dashboard.html", found, str(flipbank))
    if site is not None:
        echo_site(site)
    for feature, shown in found["features"].items():
        typer.echo(feature_sentence(feature, shown))
    typer.echo(f"dashboard: {page}\n           {out / 'dashboard.json'}")
