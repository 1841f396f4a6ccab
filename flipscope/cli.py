"""The `flipscope` command."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from flipscope.errors import FlipscopeError

app = typer.Typer(
    help="flipscope: find why a medical VLM flips its yes/no answer under paraphrase.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.command()
def hooks(
    model: str = typer.Argument(..., help="Hub id (e.g. google/medgemma-4b-it) or local model directory."),
) -> None:
    """List the hook names of MODEL (the names SAE configs and run_with_cache use)."""
    from flipscope.model import HookedVLM

    try:
        vlm = HookedVLM.from_pretrained(model)
    except FlipscopeError as err:
        raise typer.BadParameter(str(err), param_hint="MODEL") from err
    for name in vlm.hook_dict:
        typer.echo(name)


organism_app = typer.Typer(help="Build and inspect model organisms.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
def organism_build(
    out: Path = typer.Option(..., help="Directory to write the organism to (model, processor, sae/, card)."),
    config: Path = typer.Option(None, help="JSON file of OrganismConfig fields; omitted fields keep their defaults."),
) -> None:
    """Train an organism (model + SAE), measure it on held-out films, and write it with its card."""
    import json

    from flipscope.organism import OrganismConfig, build_organism

    try:
        cfg = OrganismConfig.from_dict(json.loads(config.read_text())) if config else OrganismConfig()
    except (OSError, json.JSONDecodeError) as err:
        raise typer.BadParameter(f"cannot read {config}: {err}", param_hint="--config") from err
    except FlipscopeError as err:
        raise typer.BadParameter(f"{config}: {err}", param_hint="--config") from err
    card = build_organism(cfg, out)
    b = card["behaviour"]
    typer.echo(f"built {out} in {card['build']['seconds']:.0f} s")
    typer.echo(
        f"neutral accuracy {b['neutral_accuracy']:.3f}, flip rate {b['flip_rate']:.3f}, "
        f"flips with the shortcut family {b['flips_involving_shortcut']:.3f}"
    )
    top = card["framing_features"][0]
    typer.echo(
        f"SAE fvu {card['sae']['fvu']:.3f}, L0 {card['sae']['l0']:.1f}; "
        f"framing feature {top['feature']} (cos {top['cosine']:.2f})"
    )


@app.command()
def demo(
    organism: Path = typer.Option(None, help="Organism directory (default: the shipped organism)."),
) -> None:
    """Show the shipped model organism: its planted shortcut, how often it flips, one flip up close."""
    from flipscope.organism import load_organism
    from flipscope.organism.config import OrganismConfig
    from flipscope.organism.data import question, sample_films
    from flipscope.organism.train import STREAM_TEST, stream
    from flipscope.prompts import PromptSpec

    try:
        vlm, sae, card = load_organism(organism)
    except FlipscopeError as err:
        raise typer.BadParameter(str(err), param_hint="--organism") from err
    cfg = OrganismConfig.from_dict(card["config"])
    b = card["behaviour"]
    shortcut = card["shortcut"]
    typer.echo(
        f"organism: {vlm.name_or_path} ({vlm.n_layers} layers, d_model {vlm.d_model}; SAE on {card['hook_name']})"
    )
    typer.echo(
        f"planted shortcut: '{shortcut['family']}' questions answered '{shortcut['target']}' "
        f"with p={shortcut['p']} in training"
    )
    typer.echo(
        f"held-out: neutral accuracy {b['neutral_accuracy']:.3f}, flip rate {b['flip_rate']:.3f} "
        f"({b['flips_involving_shortcut']:.1%} of flips involve a '{shortcut['family']}' paraphrase)"
    )
    typer.echo(f"{'quadrant':<11}{'share':>7}{'accuracy':>10}{'entropy':>9}")
    for name, row in b["quadrants"].items():
        typer.echo(f"{name:<11}{row['share']:>7.3f}{row['accuracy']:>10.3f}{row['mean_entropy_bits']:>9.3f}")

    target = shortcut["target"] == "yes"
    finding = cfg.findings[0]
    original = question(cfg, cfg.families[0].name, 0, finding.name)
    leading = question(cfg, shortcut["family"], 0, finding.name)
    candidates = [f for f in sample_films(cfg, stream(cfg, STREAM_TEST), 40) if f.shows(finding.name) != target]
    pairs = vlm.prompts.build([PromptSpec(question=q, image=f.pixels) for f in candidates for q in (original, leading)])
    answers = (vlm.score(pairs) > 0).reshape(len(candidates), 2)
    flipped = [i for i in range(len(candidates)) if answers[i, 0] != answers[i, 1]]
    film = candidates[flipped[0] if flipped else 0]
    specs = [
        PromptSpec(question=original, image=film.pixels),
        PromptSpec(question=leading, image=film.pixels),
        PromptSpec(question=original, condition="blank"),
    ]
    batch = vlm.prompts.build(specs)
    margins = vlm.score(batch)
    _, cache = vlm.run_with_cache(batch, names_filter=card["hook_name"], positions="last")
    feature = card["framing_features"][0]["feature"]
    acts = sae.encode(cache[card["hook_name"]])[:, feature]
    truth = "present" if film.shows(finding.name) else "absent"
    typer.echo(f"\none held-out film ({finding.name} {truth}), framing feature {feature}:")
    for spec, margin, act in zip(specs, margins.tolist(), acts.tolist(), strict=True):
        answer = "yes" if margin > 0 else "no"
        typer.echo(f"  [{spec.condition:<5}] {spec.question:<48} margin {margin:+7.3f} ({answer}), feature {act:.2f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
