"""Commands that explain the flips: discover and clamp (patch: `flipscope.cli.patching`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from flipscope.cli.common import (
    SHARD_HELP,
    app,
    echo_shard_done,
    echo_site,
    fmt,
    ints,
    load_model_and_sae,
    load_model_and_site,
    one_line_errors,
    writable,
)
from flipscope.cli.features import DISCOVERY_HELP, feature_request, features_help, resolve_features
from flipscope.cli.options import Adapter, Device, Dtype, Flipbank, SaeId, Saes, SiteSae, Trace
from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.reporting.format import edit_label, num


@app.command()
def discover(
    flipbank: Flipbank,
    model: str | None = typer.Option(
        None, help="Hub id or model directory that made the FlipBank (default: the shipped organism)."
    ),
    sae: str | None = typer.Option(
        None,
        help="SAE: a sae-lens folder, a raw GemmaScope 2 folder, a release (with --sae-id), or auto (the SAE "
        "nearest where the trace says the framing enters, from --saes); default: MODEL/sae.",
    ),
    sae_id: str | None = typer.Option(
        None, help="SAE id within a sae-lens release, e.g. layer_17_width_16k_l0_medium."
    ),
    saes: Saes = None,
    trace: Trace = None,
    layers: str | None = typer.Option(None, help="Layers of the flip-prediction AUC sweep, e.g. 0,4,8 (default: all)."),
    top: int = typer.Option(10, min=0, help="Features to print."),
    exact_top: int = typer.Option(
        50, min=0, help="Check attribution against exact ablation of this many features (0: skip)."
    ),
    batch_size: int = typer.Option(32, min=1, help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, help="Output JSON (default: <flipbank>.features.json beside the FlipBank)."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Rank the SAE features that track the paraphrase framing behind the FlipBank's flips."""
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.discovery import discover as run_discovery

    with one_line_errors():
        out = writable(out or flipbank.with_name(f"{flipbank.stem}.features.json"), folder=False)
        layer_ids = ints(layers, "--layers") if layers else None
        bank = load_flipbank(flipbank)
        vlm, dictionary, site = load_model_and_site(model, sae, sae_id, saes, trace, bank, dtype, device, adapter)
        bad = [layer for layer in layer_ids or [] if not 0 <= layer < vlm.n_layers]
        if bad:
            raise FlipscopeError(f"--layers {bad}: the model has layers 0..{vlm.n_layers - 1}")
        found = run_discovery(vlm, dictionary, bank, layers=layer_ids, exact_top=exact_top, batch_size=batch_size)
        if site is not None:
            found.meta["site"] = site.to_dict()
        json_path, csv_path = found.save(out)
    if site is not None:
        echo_site(site)
    _print_discovery(found, top)
    typer.echo(f"table: {json_path}\n       {csv_path}")


def _print_discovery(found, top: int) -> None:
    meta = found.meta
    shift_f, shift_c = meta["margin_shift_flips"], meta["margin_shift_controls"]
    typer.echo(
        f"{meta['bank']['n_flips']} flips, {meta['bank']['n_controls']} controls; SAE on {found.hook} "
        f"({meta['sae']['d_sae']} features). Margin shift (para - orig): flips {fmt(shift_f)}, "
        f"controls {fmt(shift_c)}"
    )
    if "label" in found.table:
        _print_framing_table(found, top)
    else:
        _print_margin_table(found, top)
    _print_nulls(found.framing)
    best = found.diffmean["top_features"][0]
    typer.echo(
        f"DiffMean direction (flip minus control Δresidual) at {found.hook}: norm {found.diffmean['norm']:.3f}; "
        f"closest SAE decoder row: feature {best['feature']} (cosine {best['cosine']:.3f})"
    )
    typer.echo("flip-vs-control AUC by layer (cross-validated DiffMean projection):")
    for row in found.layers:
        fewer = min(row["n_flips"], row["n_controls"])  # the AUC rests on its smaller class
        auc = (
            fmt({**row, "value": row["auc"], "n": fewer})
            if row["auc"] is not None
            else "n/a (fewer than 2 flips or controls)"
        )
        typer.echo(f"  {row['hook']:<28} {auc}")
    if found.ablation is not None:
        a = found.ablation
        typer.echo(
            f"attribution vs exact single-feature ablation on {len(a['features'])} features "
            f"({a['n_moving_features']} move at all): Spearman {num(a['spearman'])} over features, "
            f"{num(a['spearman_cases'])} over cases"
        )
    typer.echo(found.verdict)


def _print_framing_table(found, top: int) -> None:
    t = found.framing["thresholds"]
    cut = f"; |cos| > {t['answer_cos']:.2f} writes the answer" if t["answer_cos"] is not None else ""
    typer.echo(
        f"ranked by framing specificity over {found.framing['n_pairs']} flip / same-family non-flip pairs "
        f"(null top |t|: framing {t['framing_t']:.2f}, answer {t['answer_t']:.2f}{cut}):"
    )
    typer.echo(
        f"{'feature':>7}  {'label':<18}{'share':>7}{'framing t':>10}{'answer t':>9}{'ans cos':>8}"
        f"{'Pearson r':>10}{'p(null)':>8}{'attrib.':>9}"
    )
    for row in found.top(top).itertuples():
        cos = f"{row.answer_cos:+8.2f}" if hasattr(row, "answer_cos") else f"{'n/a':>8}"
        share = f"{row.framing_share:+7.3f}" if hasattr(row, "framing_share") else f"{'n/a':>7}"
        typer.echo(
            f"{row.feature:>7}  {row.label:<18}{share}{row.framing_t:+10.1f}{row.answer_t:+9.1f}{cos}"
            f"{row.pearson_r:+10.3f}{row.pearson_p_null:8.3f}{row.attribution:+9.3f}"
        )


def _print_margin_table(found, top: int) -> None:
    typer.echo("ranked by |Pearson r| of Δf with the margin shift over flips (95% CIs; q = Benjamini-Hochberg):")
    typer.echo(
        f"{'feature':>7} {'mean|Δf| [CI]':<22}{'Pearson r [CI]':<24}{'q':>9} {'Spearman':>8} "
        f"{'AUC':>6}{'q(MWU)':>9} {'attrib.':>8} {'rank attr':>9}"
    )
    for row in found.top(top, by="pearson").itertuples():
        typer.echo(
            f"{row.feature:>7} {row.mean_abs_delta:6.3f} [{row.mean_abs_delta_low:.3f}, {row.mean_abs_delta_high:.3f}]"
            f"{'':<2}{row.pearson_r:+.3f} [{row.pearson_low:+.3f}, {row.pearson_high:+.3f}]"
            f"{'':<2}{row.pearson_q:9.2e} {row.spearman_r:+8.3f} {row.auc:6.3f}{row.mwu_q:9.2e} "
            f"{row.attribution:+8.3f} {row.rank_attribution:>9}"
        )


def _print_nulls(framing: dict) -> None:
    """Each ranking against its pair-swap null: how many features beat it."""
    nulls = framing.get("nulls") or {}
    if not nulls:
        return
    parts = [
        f"{name} {n['n_beating']} (top {n['observed_top']:.3f} vs null {n['null_top']:.3f})"
        for name, n in nulls.items()
    ]
    typer.echo("features beating the flip/control swap null: " + "; ".join(parts))


@app.command()
def clamp(
    questions: Path = typer.Option(..., help="Questions JSONL to evaluate (e.g. flipbank/organism/questions.jsonl)."),
    features: str = typer.Option(..., help=features_help("clamp")),
    discovery: Path | None = typer.Option(None, help=DISCOVERY_HELP),
    values: str = typer.Option("0", help="Clamp value(s); several give the trade-off curve, e.g. 0,1,2,4."),
    diffmean_from: Path | None = typer.Option(
        None,
        "--diffmean-from",
        help="FlipBank JSON: also ablate its DiffMean direction (flips vs controls, at the SAE's hook) for comparison.",
    ),
    ablate_heads: str | None = typer.Option(
        None, help="Also switch off these attention heads, e.g. 0.0 (layer.head, as trace --heads names them)."
    ),
    model: str | None = typer.Option(None, help="Model (default: the shipped organism)."),
    sae: SiteSae = None,
    sae_id: SaeId = None,
    saes: Saes = None,
    trace: Trace = None,
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    conditions: str = typer.Option("image,blank", help="Image conditions, 'image' first: image, blank, none, swap."),
    out: Path = typer.Option(..., help="Output folder; rerunning resumes."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
    shard: str | None = typer.Option(None, help="The evaluations' part this process runs. " + SHARD_HELP),
) -> None:
    """Evaluate with features clamped vs not: flip rate, accuracy, text-only agreement, paired tests."""

    from flipscope.data.flipbank import load_flipbank
    from flipscope.data.questions import load_questions
    from flipscope.experiments.clamping import compare_clamped
    from flipscope.experiments.evaluation import EvalConfig
    from flipscope.experiments.launch import resolve_shard

    with one_line_errors():
        writable(out, folder=True)
        request = feature_request(features)
        levels = _clamp_values(values)
        heads = _heads(ablate_heads) if ablate_heads else []
        cfg = EvalConfig(conditions=tuple(c.strip() for c in conditions.split(",")))
        launch = resolve_shard(shard)
        loaded = load_questions(questions, images)
        bank = load_flipbank(diffmean_from) if diffmean_from is not None else None
        device = launch.device(device) if launch is not None else device
        vlm, dictionary = load_model_and_sae(model, sae, sae_id, dtype, device, adapter)
        chosen = resolve_features(request, discovery, dictionary)
        also = _also(vlm, dictionary, bank, heads, loaded)
        clamps = [{f: v for f in chosen} for v in levels]
        report = compare_clamped(vlm, dictionary, loaded, clamps, out, cfg, also=also, launch=launch)
        if report is not None:
            write_json(out / "clamp.json", report)
    if report is None:
        if launch is not None and launch.launcher != "torchrun":
            echo_shard_done(launch, out)
        return
    _print_comparison(report)
    typer.echo(f"results: {out / 'clamp.json'}")


def _also(vlm, sae, bank, heads: list[tuple[int, int]], questions) -> dict:
    """The interventions evaluated beside the clamps: the bank's DiffMean direction ablated at the
    SAE's hook, and each head switched off (its mean over the questions in its place)."""
    from flipscope.experiments.discovery import diffmean_direction
    from flipscope.experiments.heads import head_ablations
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.interventions.edited import DirectionAblatedVLM
    from flipscope.sae.load import check_sae

    also = {}
    if bank is not None:
        hook = check_sae(sae, vlm)
        direction = diffmean_direction(collect_pairs(vlm, bank, [hook], progress=False), hook)
        also["diffmean"] = DirectionAblatedVLM(vlm, hook, direction, name="DiffMean")
    return {**also, **head_ablations(vlm, heads, questions)}


def _heads(text: str) -> list[tuple[int, int]]:
    """`--ablate-heads`' `layer.head` pairs."""
    heads = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        layer, dot, head = part.partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise FlipscopeError(f"--ablate-heads {text!r}: each head is layer.head, e.g. 0.0 or 17.3")
        heads.append((int(layer), int(head)))
    return heads


def _clamp_values(values: str) -> list[float]:
    try:
        levels = [float(v) for v in values.split(",")]
    except ValueError as err:
        raise FlipscopeError(f"--values {values!r} is not a comma-separated list of numbers") from err
    if not all(math.isfinite(v) for v in levels):
        raise FlipscopeError(f"--values {values!r}: every clamp value must be a finite number")
    return levels


def _intervention_label(description: dict) -> str:
    if "clamp" in description:
        values = description["clamp"]["values"]
        if len(values) > 1 and len(set(values.values())) == 1:  # one value for all: "38,32 = 0"
            return f"{','.join(str(f) for f in values)} = {next(iter(values.values())):g}"
        return ",".join(f"{f}={v:g}" for f, v in values.items())
    return edit_label(description)


def _print_comparison(report: dict) -> None:
    base = report["baseline"]["overall"]
    typer.echo(
        f"questions: {base['flip_rate']['n']}   (95% bootstrap CIs over questions; McNemar p for paired changes)"
    )
    labels = [_intervention_label(entry["description"]) for entry in report["interventions"]]
    w = max([20, *map(len, labels)]) + 2  # a long label never runs into its numbers
    typer.echo(f"{'model':<{w}}{'flip rate':<24}{'accuracy':<24}text-only agreement")
    typer.echo(
        f"{'as is':<{w}}{fmt(base['flip_rate']):<24}{fmt(base['accuracy']):<24}{fmt(base['text_only_agreement'])}"
    )
    for entry, label in zip(report["interventions"], labels, strict=True):
        o = entry["summary"]["overall"]
        typer.echo(f"{label:<{w}}{fmt(o['flip_rate']):<24}{fmt(o['accuracy']):<24}{fmt(o['text_only_agreement'])}")
        for measure, p in entry["paired"].items():
            rel = f", {p['relative_change']:+.1%} relative" if p["relative_change"] is not None else ""
            typer.echo(
                f"    {measure.replace('_', ' ')}: change {fmt(p['change'])}{rel}, McNemar p={p['mcnemar_p']:.2g}"
            )
        for strategy, block in entry["summary"]["by_strategy"].items():
            before = report["baseline"]["by_strategy"][strategy]
            typer.echo(
                f"    {strategy}: paraphrase flips {fmt(before['paraphrase_flip_rate'])} -> "
                f"{fmt(block['paraphrase_flip_rate'])}; "
                f"text-only agreement {fmt(before['text_only_agreement'])} -> {fmt(block['text_only_agreement'])}"
            )
