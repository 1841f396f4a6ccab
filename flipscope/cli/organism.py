"""Commands on model organisms and the demo: organism build, organism flipbank, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flipscope.cli.common import app, fmt, one_line_errors, organism_app, writable
from flipscope.cli.options import OrganismDir
from flipscope.errors import FlipscopeError
from flipscope.kernels import prefer_portable
from flipscope.reporting.format import num


@organism_app.command("build")
def organism_build(
    out: Path = typer.Option(..., help="Directory to write the organism to (model, processor, sae/, card)."),
    config: Path | None = typer.Option(
        None,
        help="JSON file of OrganismConfig fields (omitted fields keep their defaults), or a shipped "
        "organism's name (default, gemma3-270m) to rebuild it.",
    ),
) -> None:
    """Train an organism (model + SAE), measure it on held-out films, and write it with its card."""
    prefer_portable()  # before torch loads: the build's bits are then any AVX2 CPU's
    from flipscope.organism import build_organism

    cfg = _read_config(config)
    with one_line_errors():
        card = build_organism(cfg, writable(out, folder=True))
    b = card["behaviour"]
    typer.echo(f"built {out} in {card['build']['seconds']:.0f} s")
    typer.echo(
        f"neutral accuracy {num(b['neutral_accuracy'])}, flip rate {num(b['flip_rate'])}, "
        f"flips with the {card['shortcut']['family']} family {num(b['flips_involving_shortcut'])}"
    )
    typer.echo(f"SAE fvu {card['sae']['fvu']:.3f}, L0 {card['sae']['l0']:.1f}; {_framing_line(card)}")


def _read_config(config: Path | None) -> Any:
    """The `OrganismConfig` of `--config`: a preset's name, a JSON file of fields, or the default."""
    import json

    from flipscope.organism import OrganismConfig
    from flipscope.organism.config import PRESETS

    try:
        if config is not None and str(config) in PRESETS and not config.exists():
            return OrganismConfig.preset(str(config))
        return OrganismConfig.from_dict(json.loads(config.read_bytes().decode("utf-8"))) if config else OrganismConfig()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        known = ", ".join(sorted(PRESETS))
        msg = f"cannot read {config}: {err}; expected a preset ({known}) or a JSON file of OrganismConfig fields"
        raise typer.BadParameter(msg, param_hint="--config") from err
    except FlipscopeError as err:
        raise typer.BadParameter(f"{config}: {err}", param_hint="--config") from err


@organism_app.command("sweep")
def organism_sweep(
    out: Path = typer.Option(..., help="Folder of the sweep: runs/<regime>-s<seed>/, summary.json, the figure."),
    config: Path | None = typer.Option(
        "small", help="The organism every run starts from: a preset's name (small, default) or a JSON file of fields."
    ),
    regimes: str = typer.Option("canonical,augmented,shortcut", help="Comma-separated training-phrasing regimes."),
    seeds: int = typer.Option(5, min=1, help="Seeds per regime (0 .. seeds-1)."),
    withheld: str = typer.Option("formal", help="Comma-separated families no regime trains on ('' for none)."),
    png: bool = typer.Option(True, help="Also write the figure as PNG (needs a Chromium)."),
) -> None:
    """Train the organism under each training-phrasing regime × seed (resumable) and compare the
    regimes' flip rates on seen and withheld phrasings, with tests across seeds."""
    prefer_portable()  # before torch loads: the build's bits are then any AVX2 CPU's
    import dataclasses

    from flipscope.data.atomic import write_json
    from flipscope.organism.sweep import run_sweep
    from flipscope.organism.sweep_stats import summarize_sweep
    from flipscope.reporting.files import save_figures
    from flipscope.reporting.sweep_report import COLUMNS, sweep_figure, sweep_rows, sweep_sentences

    base = _read_config(config)
    with one_line_errors():
        base = dataclasses.replace(base, withheld_families=tuple(w for w in withheld.split(",") if w.strip()))
        records = run_sweep(base, [r.strip() for r in regimes.split(",")], range(seeds), writable(out, folder=True))
        summary = summarize_sweep(records)
        write_json(out / "summary.json", {"runs": records, "summary": summary}, allow_nan=False)
        written = save_figures({"sweep": sweep_figure(summary)}, out, {"regimes": regimes, "seeds": seeds}, png=png)
    typer.echo(" | ".join(COLUMNS))
    for row in sweep_rows(summary):
        typer.echo(" | ".join(row))
    for sentence in sweep_sentences(summary):
        typer.echo(sentence)
    typer.echo(
        f"figure: {written['html'][0]}"
        + (f" (PNG skipped: {written['png_skipped']})" if written["png_skipped"] else "")
    )


@organism_app.command("evidence")
def organism_evidence(
    out: Path = typer.Option(..., help="Folder for evidence.json and the overlay figure."),
    organism: OrganismDir = None,
    films: int = typer.Option(50, min=1, help="Held-out films (the test stream's first)."),
    png: bool = typer.Option(True, help="Also write the figure as PNG (needs a Chromium)."),
) -> None:
    """Score image-evidence maps (occlusion, attention, gradient x input, integrated gradients) against
    the organism's drawn findings and for faithfulness, the image-evidence share by wording and
    quadrant, and draw two flips and a Dangerous case."""
    from flipscope.data.atomic import write_json
    from flipscope.organism import OrganismConfig, load_organism
    from flipscope.organism.behaviour import margin_table
    from flipscope.organism.data import sample_films
    from flipscope.organism.evidence_study import evidence_study, picture_cases
    from flipscope.organism.train import STREAM_TEST, stream
    from flipscope.reporting.evidence_plots import overlay_figure
    from flipscope.reporting.evidence_report import evidence_sentences
    from flipscope.reporting.files import save_figures
    from flipscope.reporting.format import fmt

    with one_line_errors():
        writable(out, folder=True)
        vlm, _, card = load_organism(organism)
        cfg = OrganismConfig.from_dict(card["config"])
        held_out = sample_films(cfg, stream(cfg, STREAM_TEST), films)
        table = margin_table(vlm, cfg, held_out)
        found = evidence_study(vlm, cfg, held_out, table=table)
        write_json(out / "evidence.json", found, allow_nan=False)
        cases = picture_cases(vlm, cfg, held_out, table=table)
        if cases:
            save_figures({"overlays": overlay_figure(cases)}, out, {"films": films}, png=png)
    random = found["methods"]["random"]
    typer.echo(f"random order: deletion {fmt(random['deletion_area'])}, insertion {fmt(random['insertion_area'])}")
    for method, s in found["methods"].items():
        if method != "random":
            typer.echo(f"{method}: pointing {fmt(s['hit'])} (random map {fmt(s['hit_random'])}), mass on the finding "
                       f"{fmt(s['mass'])} (random {fmt(s['mass_random'])}), deletion {fmt(s['deletion_area'])}, "
                       f"insertion {fmt(s['insertion_area'])}")  # fmt: skip
    for name, e in found["share"]["by_family"].items():
        typer.echo(f"image-evidence share, {name} wordings: {fmt(e)}")
    for name, e in found["share"]["by_quadrant"].items():
        typer.echo(f"image-evidence share of the original, {name}: {fmt(e)}")
    for sentence in evidence_sentences(found):
        typer.echo(sentence)
    typer.echo(f"evidence: {out / 'evidence.json'}" + (f"; overlays: {out / 'overlays.html'}" if cases else ""))


def _framing_line(card: dict) -> str:
    """The card's framing verdict: a framing feature only when the direction beats its null."""
    d = card["directions"]
    if d is None:
        return "nothing planted, so no ground-truth framing direction"
    null = max(d["framing_null_norms"])
    if not d["framing_significant"]:
        return (
            f"the shortcut wording's direction (norm {d['framing_norm']:.2f} over {d['framing_items']} unflipped "
            f"items) does not exceed its split-half null (up to {null:.2f}): no framing feature"
        )
    aligned = [f for f in card["framing_features"] if f["aligned"]]
    if not aligned:
        return f"framing direction norm {d['framing_norm']:.2f} (null up to {null:.2f}), carried by no single feature"
    top = aligned[0]
    return (
        f"framing direction norm {d['framing_norm']:.2f} (null up to {null:.2f}); framing feature {top['feature']} "
        f"(share {top['share']:.2f}, cos {top['cosine']:.2f})"
    )


@organism_app.command("flipbank")
def organism_flipbank(
    out: Path = typer.Option(..., help="Folder to write films, questions, evaluation and flipbank.json to."),
    organism: OrganismDir = None,
    n_films: int = typer.Option(40, min=1, help="Held-out films to evaluate (4 questions each)."),
    min_margin: float = typer.Option(
        0.2, min=0, help="Keep flips whose two margins are both at least this far from 0."
    ),
) -> None:
    """Evaluate held-out films of an organism and curate its FlipBank (what flipbank/organism holds)."""
    import json

    from flipscope.data.curation import CurationRules
    from flipscope.organism.bank import DEFAULT_RULES, build_flipbank

    rules = CurationRules(**{**DEFAULT_RULES.to_dict(), "min_margin": min_margin})
    with one_line_errors():
        writable(out, folder=True)
    try:
        path = build_flipbank(out, organism, n_films=n_films, rules=rules)
    except FlipscopeError as err:
        raise typer.BadParameter(str(err), param_hint="--organism") from err
    bank = json.loads(path.read_text())
    typer.echo(f"{bank['n_flips']} flip cases, {bank['n_controls']} controls: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("figures"), help="Folder for the figures, summary.json and report.html."),
    work: Path | None = typer.Option(
        None, help="Folder for the stages' resumable stores and finished stages' records (default: OUT/work)."
    ),
    organism: OrganismDir = None,
    films: int | None = typer.Option(
        None,
        min=1,
        help="Held-out films to evaluate, 4 questions each (default 40; 20 for an organism on a real base).",
    ),
    png: bool = typer.Option(True, help="Also render PNGs (needs Chromium; skipped with a message if absent)."),
    study: bool = typer.Option(
        False,
        help="Instead: the false-reliability-trap study, 5 configurations (organism + 4 LoRA) x 2 sites, compared.",
    ),
) -> None:
    """The main job: evaluate the organism, curate its FlipBank, discover, patch, clamp, and write the report."""
    from flipscope.reporting.demo import run_demo

    if study:
        _study(out, organism, films, png)
        return
    with one_line_errors():
        writable(out, folder=True)
        if work is not None:
            writable(work, folder=True, option="--work")
        s = run_demo(out, work, organism=organism, n_films=films, png=png, echo=typer.echo)
    o = s["evaluation"]["overall"]
    typer.echo(
        f"\nflip rate {fmt(o['flip_rate'])}, accuracy {fmt(o['accuracy'])}; "
        f"FlipBank {s['flipbank']['n_flips']} flips, {s['flipbank']['n_controls']} controls"
    )
    if s["patching"] is None:
        typer.echo(
            f"no flips to explain; Dangerous (consistent, the same without the image): "
            f"{fmt(s['evaluation']['by_quadrant']['Dangerous']['share'])}"
        )
    else:
        _echo_mechanism(s)
    typer.echo(f"figures: {out}/*.html" + ("" if s["png_skipped"] else f", {out}/*.png"))
    typer.echo(f"report: {out / 'report.html'}")


def _echo_mechanism(s: dict) -> None:
    """The demo's patching and clamping headline."""
    disc = s["patching"]["discovered"]
    c = s["clamping"]
    zero = c["interventions"][0]
    typer.echo(
        f"removing features {disc['setup']['features']}: recovery {fmt(disc['flips']['mean_recovery'])}, "
        f"reversed {fmt(disc['flips']['share_reversed'])}"
    )
    typer.echo(
        f"clamping feature {c['feature']} to {c['values'][0]:g}: flip rate "
        f"{fmt(c['baseline']['overall']['flip_rate'])} -> {fmt(zero['summary']['overall']['flip_rate'])}, "
        f"accuracy change {fmt(zero['paired']['accuracy']['change'])}"
    )


def _study(out: Path, organism: Path | None, films: int | None, png: bool) -> None:
    from flipscope.reporting.compare_report import correlation_sentence, screening_sentence
    from flipscope.reporting.study import run_study

    with one_line_errors():
        writable(out, folder=True)
        found = run_study(out, organism=organism, n_films=films if films is not None else 40, png=png, echo=typer.echo)
    for name in found["names"]:
        t = found["runs"][name]
        typer.echo(
            f"{name}: flip rate {fmt(t['flip_rate'])}, Dangerous {fmt(t['quadrants']['Dangerous']['share'])}, "
            f"accuracy {fmt(t['accuracy'])}"
        )
    typer.echo(correlation_sentence(found["correlation"]))
    for name in found["names"]:
        typer.echo(screening_sentence(name, found["runs"][name].get("screening")))
    typer.echo(f"report: {out / 'compare.html'}")


@organism_app.command("finetune")
def organism_finetune(
    out: Path = typer.Option(..., help="Folder to write the adapters to, one subfolder per configuration."),
    organism: OrganismDir = None,
    only: str | None = typer.Option(None, help="Comma-separated configuration names (default: all of them)."),
) -> None:
    """LoRA-fine-tune the organism the way deployment fine-tunes are made (consistent, text-heavy data);
    writes each adapter (what ships) with its training log."""
    prefer_portable()  # before torch loads: the build's bits are then any AVX2 CPU's
    from flipscope.organism import OrganismConfig, load_organism
    from flipscope.organism.finetune import FINETUNES, finetune

    with one_line_errors():
        writable(out, folder=True)
        names = [n.strip() for n in only.split(",")] if only else [ft.name for ft in FINETUNES]
        unknown = sorted(set(names) - {ft.name for ft in FINETUNES})
        if unknown:
            raise FlipscopeError(f"--only {unknown}: unknown; the configurations are {[ft.name for ft in FINETUNES]}")
        vlm, _, card = load_organism(organism)
        cfg = OrganismConfig.from_dict(card["config"])
        for ft in FINETUNES:
            if ft.name in names:
                log = finetune(vlm, cfg, ft, out / ft.name)
                typer.echo(
                    f"{ft.name}: final loss {log['final_loss']:.3f}, adapter {log['adapter_bytes'] / 1e3:.0f} kB"
                )


@organism_app.command("entry-sae")
def organism_entry_sae(
    hook: str = typer.Option(
        "blocks.0.hook_attn_out", help="Where the framing enters (the site `flipscope trace` names)."
    ),
    organism: OrganismDir = None,
    d_sae: int | None = typer.Option(None, help="Dictionary size (default: the organism's first SAE's)."),
) -> None:
    """Train the organism's second SAE, at the entry site, by its own recipe; record it in the card."""
    prefer_portable()  # before torch loads: the build's bits are then any AVX2 CPU's
    from flipscope.organism.entry_sae import ENTRY_DIR, train_entry_sae

    with one_line_errors():
        entry = train_entry_sae(organism, hook, d_sae=d_sae)
    typer.echo(
        f"entry SAE at {entry['hook']}: {entry['d_sae']} features; held-out FVU {entry['fvu']:.4f}, "
        f"L0 {entry['l0']:.1f}, dead {entry['dead_share']:.1%} ({ENTRY_DIR}/)"
    )
