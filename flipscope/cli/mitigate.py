"""`flipscope mitigate cure` and `flipscope mitigate audit`: make a cure, and audit cures against the
Dangerous-quadrant trap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flipscope.cli.common import app, ints, one_line_errors, writable
from flipscope.errors import FlipscopeError

mitigate_app = typer.Typer(help="Make cures for flips and audit them against the trap.", no_args_is_help=True)
app.add_typer(mitigate_app, name="mitigate")

ORGANISM_HELP = "Organism directory, or a shipped organism's name (default, gemma3-270m; default: default)."


@mitigate_app.command("cure")
def cure(
    kind: str = typer.Argument(..., help="fold (weight edit), consistency (layer-restricted LoRA) or augment (LoRA)."),
    out: Path = typer.Option(..., help="Folder to write the cure to (a checkpoint, or an adapter)."),
    organism: Path | None = typer.Option(None, help=ORGANISM_HELP),
    flipbank: Path | None = typer.Option(None, help="The organism's FlipBank (fold: its flips give the direction)."),
    direction: str = typer.Option(
        "framing",
        help="fold: framing or diffmean (from --flipbank at --hook), features:F1,F2 (SAE decoder rows), "
        "or a .npy file of one vector or a stack.",
    ),
    hook: str = typer.Option("blocks.0.hook_attn_out", help="fold: where the framing direction is measured."),
    layers: str = typer.Option("0", help="Layers whose writers are edited (fold) or adapted (consistency)."),
    components: str = typer.Option("attn", help="fold: writers to edit, attn and/or mlp."),
    withheld: str = typer.Option("formal", help="Families the fine-tunes never see ('' for none)."),
) -> None:
    """Make one cure of the organism: a weight edit saved as a checkpoint, or a LoRA adapter."""
    from flipscope.organism.cures import make_cure

    with one_line_errors():
        record = make_cure(
            kind, writable(out, folder=True), organism, flipbank=flipbank, direction=direction, hook=hook,
            layers=ints(layers, "--layers"), components=[c.strip() for c in components.split(",") if c.strip()],
            withheld=[w.strip() for w in withheld.split(",") if w.strip()],
        )  # fmt: skip
    if kind == "fold":
        writers, source = "+".join(record["components"]), record["direction"]
        if "n_flips" in record:
            source += f" at {record['hook']} (from {record['n_flips']} flips)"
        typer.echo(f"fold: {source} removed from the {writers} writers of layers {record['layers']}; checkpoint {out}")
    else:
        typer.echo(
            f"{kind}: final loss {record['final_loss']:.3f}, adapter {record['adapter_bytes'] / 1e3:.0f} kB in {out}"
        )


def _cured_model(spec: str, base: Any, base_source: str, sae: Any) -> tuple[str, Any]:
    """(name, model) of one CURED argument: `clamp:F1,F2` (the base's SAE features held at 0), an
    adapter folder (on the base), or a checkpoint folder."""
    from flipscope.interventions.edited import ClampedVLM
    from flipscope.model.hooked import HookedVLM

    if spec.startswith("clamp:"):
        features = ints(spec.removeprefix("clamp:"), spec)
        if not features:
            raise FlipscopeError(f"{spec!r}: name the features to clamp, e.g. clamp:38,3")
        return "clamp-" + "-".join(map(str, features)), ClampedVLM(base, sae, dict.fromkeys(features, 0.0))
    path = Path(spec)
    if (path / "adapter_config.json").is_file():
        return path.name, HookedVLM.from_pretrained(base_source, adapter=path)
    if (path / "config.json").is_file():
        return path.name, HookedVLM.from_pretrained(path)
    raise FlipscopeError(f"CURED {spec!r}: not clamp:FEATURES, an adapter folder or a checkpoint folder")


@mitigate_app.command("audit")
def audit(
    cured: list[str] = typer.Argument(..., help="Cures: checkpoint folders, adapter folders, or clamp:F1,F2."),
    base: Path | None = typer.Option(None, help=ORGANISM_HELP),
    films: int = typer.Option(100, min=1, help="Held-out films to audit on (each asked about every finding)."),
    first_film: int = typer.Option(40, min=0, help="Skip this many held-out films (those the FlipBank used)."),
    withheld: str = typer.Option("formal", help="Families the cures never trained on, measured apart ('' for none)."),
    out: Path = typer.Option(..., help="Folder for the stores (resumable), audit.json and audit.html."),
    png: bool = typer.Option(True, help="Also write the figure as PNG (needs a Chromium)."),
) -> None:
    """Audit cures of an organism against the trap: paired changes in flips, accuracy, Dangerous share
    (by the blank and by an opposite-label film) and text-only agreement on held-out films, with
    CIs, McNemar and verdicts per cure."""
    from flipscope.data.atomic import write_json
    from flipscope.data.questions import load_questions
    from flipscope.experiments.audit import audit_cures
    from flipscope.organism import OrganismConfig, load_organism, organism_checkpoint
    from flipscope.organism.questions import export_questions
    from flipscope.reporting.audit_report import audit_figure, audit_sentences, write_audit_report
    from flipscope.reporting.files import save_figures

    with one_line_errors():
        writable(out, folder=True)
        vlm, sae, card = load_organism(base)
        models = dict(_cured_model(spec, vlm, str(organism_checkpoint(base)), sae) for spec in cured)
        if len(models) != len(cured):
            raise FlipscopeError("two cures have the same name (folder name); rename one")
        cfg = OrganismConfig.from_dict(card["config"])
        questions = load_questions(export_questions(cfg, out / "data", n_films=films, first=first_film))
        names = [w.strip() for w in withheld.split(",") if w.strip()]
        found = audit_cures(vlm, models, questions, out, withheld=names)
        write_json(out / "audit.json", found, allow_nan=False)
        figures = {"trap": audit_figure(found)}
        save_figures(figures, out, {"films": films, "first_film": first_film, "withheld": names}, png=png)
        page = write_audit_report(out / "audit.html", found, figures)
    for sentence in audit_sentences(found):
        typer.echo(sentence)
    typer.echo(f"report: {page}")
    typer.echo(json.dumps({c["name"]: [c["verdict"], c["verdict_opposite"]] for c in found["cures"]}))
