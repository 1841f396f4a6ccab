"""The `flipscope` command."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from flipscope.errors import FlipscopeError

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names the --dtype options take


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn a `FlipscopeError` (bad input: a path, a field, an option value) into one line on
    stderr and exit status 2."""
    try:
        yield
    except FlipscopeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


app = typer.Typer(
    help="flipscope: find why a medical VLM flips its yes/no answer under paraphrase.",
    epilog="Start with `flipscope demo` (the whole story on the shipped organism). On your own model: "
    "evaluate -> curate -> discover -> patch -> clamp; each command's --help says what it reads and writes.",
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


@app.command()
def evaluate(
    model: str = typer.Option(..., help="Hub id (e.g. google/medgemma-4b-it) or local model directory."),
    questions: Path = typer.Option(..., help="Questions JSONL: id, image, finding, answer, question, paraphrases."),
    images: Path | None = typer.Option(
        None, help="Directory that relative image paths are resolved against (default: beside the questions file)."
    ),
    conditions: str = typer.Option(
        "image,blank", help="Comma-separated image conditions, 'image' first: image, blank, none, swap."
    ),
    blank: str = typer.Option("gray", help="What 'blank' shows: gray, white or noise (mean 128, sd 64)."),
    batch_size: int = typer.Option(32, help="Prompts per forward pass."),
    out: Path = typer.Option(..., help="Output directory; rerunning the same command resumes what is there."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device: cpu, cuda, cuda:1, ..."),
    generate_tokens: int = typer.Option(
        0, help="Also generate this many tokens per prompt and keyword-parse them, as the paper does (0: off)."
    ),
    answers: str = typer.Option(
        "margin", help="Answers the summary uses: margin (its sign) or generated (parsed text)."
    ),
    reliance: str | None = typer.Option(
        None,
        help="Condition that counts as 'image removed' for reliance: blank, none or swap (default: blank, else none).",
    ),
    shard: str | None = typer.Option(
        None, help="Run shard K/N of the questions only (one per GPU or array task); join with `flipscope merge`."
    ),
) -> None:
    """Score every question and paraphrase under each image condition; print flips and quadrants."""
    import torch

    from flipscope.model import HookedVLM
    from flipscope.questions import load_questions
    from flipscope.sweep import EvalConfig, parse_shard, run_sweep

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    with _one_line_errors():
        cfg = EvalConfig(
            conditions=tuple(c.strip() for c in conditions.split(",")),
            blank=blank,
            batch_size=batch_size,
            generate_tokens=generate_tokens,
        )
        if answers not in ("margin", "generated"):
            raise FlipscopeError(f"--answers {answers!r} is not 'margin' or 'generated'")
        if answers == "generated" and not generate_tokens:
            raise FlipscopeError("--answers generated needs --generate-tokens > 0")
        if reliance is not None and reliance not in cfg.conditions:
            raise FlipscopeError(
                f"--reliance {reliance!r} is not among the evaluated conditions {list(cfg.conditions)}"
            )
        part = parse_shard(shard) if shard else None
        loaded = load_questions(questions, images)
        vlm = HookedVLM.from_pretrained(model, dtype=getattr(torch, dtype), device=device)
        store = run_sweep(vlm, loaded, cfg, out / "results.jsonl", shard=part)
    if part is not None:
        typer.echo(f"shard {shard} done: {store.path}; join the shards with `flipscope merge`")
        return
    _write_summary(store.path, out, reliance=reliance, source=answers)


@app.command()
def merge(
    shards: list[Path] = typer.Argument(
        ..., help="Output directories of `flipscope evaluate --shard K/N`, all N of them."
    ),
    out: Path = typer.Option(..., help="Directory for the merged results.jsonl and summary.json."),
) -> None:
    """Join shard results into the store a single process would have written, and summarize it."""
    from flipscope.sweep import merge_shards

    with _one_line_errors():
        store = merge_shards([d / "results.jsonl" for d in shards], out / "results.jsonl")
    _write_summary(store.path, out)


def _write_summary(rows_path: Path, out: Path, *, reliance: str | None = None, source: str = "margin") -> None:
    import json

    from flipscope.evaluate import summarize
    from flipscope.store import read_rows

    with _one_line_errors():
        summary = summarize(read_rows(rows_path), removed=reliance, source=source)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary)
    typer.echo(f"rows: {rows_path}\nsummary: {out / 'summary.json'}")


def _fmt(estimate: dict) -> str:
    if estimate["n"] == 0:
        return "n/a"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _print_summary(summary: dict) -> None:
    overall = summary["overall"]
    typer.echo(f"questions: {overall['n_questions']}   (95% bootstrap CIs over questions)")
    for key in ("flip_rate", "pairwise_disagreement", "accuracy", "text_only_agreement", "swap_sensitivity"):
        typer.echo(f"  {key.replace('_', ' '):<24}{_fmt(overall[key])}")
    typer.echo(f"{'finding':<20}{'n':>5}  flip rate")
    for name, block in summary["by_finding"].items():
        typer.echo(f"{name:<20}{block['n_questions']:>5}  {_fmt(block['flip_rate'])}")
    typer.echo(f"{'strategy':<20}{'n':>5}  paraphrase flip rate")
    for name, block in summary["by_strategy"].items():
        typer.echo(f"{name:<20}{block['n_paraphrases']:>5}  {_fmt(block['paraphrase_flip_rate'])}")
    typer.echo(f"{'quadrant':<12}{'n':>5}  {'share':<24}{'accuracy':<24}entropy (bits)")
    for name, block in summary["by_quadrant"].items():
        typer.echo(
            f"{name:<12}{block['n_questions']:>5}  {_fmt(block['share']):<24}{_fmt(block['accuracy']):<24}"
            f"{_fmt(block['mean_entropy_bits'])}"
        )


@app.command()
def curate(
    results: Path = typer.Option(..., help="Output directory of `flipscope evaluate` (holds results.jsonl)."),
    questions: Path = typer.Option(..., help="The questions JSONL that evaluation ran on."),
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    out: Path = typer.Option(..., help="FlipBank file to write (e.g. flipbank/mymodel/flipbank.json)."),
    min_margin: float = typer.Option(0.0, help="Keep flips whose two margins are both at least this far from 0."),
    use_generated: bool = typer.Option(
        False, help="Flip on the keyword-parsed generated answers (both must parse without hedges)."
    ),
    min_similarity: float | None = typer.Option(
        None, help="Keep paraphrases with similarity >= this (rows must carry a 'similarity' value)."
    ),
    controls_per_flip: int = typer.Option(1, help="Non-flip controls drawn per flip, from the same questions."),
    seed: int = typer.Option(0, help="Seed of the control draw."),
) -> None:
    """Curate a FlipBank (flip cases + matched non-flip controls) from an evaluation."""
    from flipscope.flipbank import CurationRules, save_flipbank
    from flipscope.flipbank import curate as curate_bank
    from flipscope.questions import load_questions
    from flipscope.store import read_header, read_rows

    with _one_line_errors():
        rules = CurationRules(
            min_margin=min_margin,
            use_generated=use_generated,
            min_similarity=min_similarity,
            controls_per_flip=controls_per_flip,
            seed=seed,
        )
        store = results / "results.jsonl" if results.is_dir() else results
        if not store.is_file():
            raise FlipscopeError(f"{str(store)!r} does not exist; pass the output directory of `flipscope evaluate`")
        bank = curate_bank(read_rows(store), load_questions(questions, images), rules, source=read_header(store))
        path = save_flipbank(bank, out)
    directions = sorted({c["direction"] for c in bank["flips"]})
    counts = ", ".join(f"{sum(c['direction'] == d for c in bank['flips'])} {d}" for d in directions)
    typer.echo(f"{bank['n_flips']} flip cases ({counts}), {bank['n_controls']} controls: {path}")


@app.command()
def discover(
    flipbank: Path = typer.Option(..., help="FlipBank JSON (e.g. flipbank/organism/flipbank.json)."),
    model: str | None = typer.Option(
        None, help="Hub id or model directory that made the FlipBank (default: the shipped organism)."
    ),
    sae: str | None = typer.Option(
        None,
        help="SAE: a sae-lens folder, a raw GemmaScope 2 folder, or a release (with --sae-id); default: MODEL/sae.",
    ),
    sae_id: str | None = typer.Option(
        None, help="SAE id within a sae-lens release, e.g. layer_17_width_16k_l0_medium."
    ),
    layers: str | None = typer.Option(None, help="Layers of the flip-prediction AUC sweep, e.g. 0,4,8 (default: all)."),
    top: int = typer.Option(10, help="Features to print."),
    exact_top: int = typer.Option(50, help="Check attribution against exact ablation of this many features (0: skip)."),
    batch_size: int = typer.Option(32, help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, help="Output JSON (default: <flipbank>.features.json beside the FlipBank)."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device: cpu, cuda, ..."),
) -> None:
    """Rank the SAE features that track the paraphrase framing behind the FlipBank's flips."""
    from flipscope.features import discover as run_discovery
    from flipscope.flipbank import load_flipbank

    with _one_line_errors():
        layer_ids = _ints(layers, "--layers") if layers else None
        bank = load_flipbank(flipbank)
        vlm, dictionary = _load_model_and_sae(model, sae, sae_id, dtype, device)
        bad = [layer for layer in layer_ids or [] if not 0 <= layer < vlm.n_layers]
        if bad:
            raise FlipscopeError(f"--layers {bad}: the model has layers 0..{vlm.n_layers - 1}")
        found = run_discovery(vlm, dictionary, bank, layers=layer_ids, exact_top=exact_top, batch_size=batch_size)
        json_path, csv_path = found.save(out or flipbank.with_name(f"{flipbank.stem}.features.json"))
    _print_discovery(found, top)
    typer.echo(f"table: {json_path}\n       {csv_path}")


def _print_discovery(found, top: int) -> None:
    meta = found.meta
    shift_f, shift_c = meta["margin_shift_flips"], meta["margin_shift_controls"]
    typer.echo(
        f"{meta['bank']['n_flips']} flips, {meta['bank']['n_controls']} controls; SAE on {found.hook} "
        f"({meta['sae']['d_sae']} features). Margin shift (para - orig): flips {_fmt(shift_f)}, "
        f"controls {_fmt(shift_c)}"
    )
    typer.echo("ranked by |Pearson r| of Δf with the margin shift over flips (95% CIs; q = Benjamini-Hochberg):")
    typer.echo(
        f"{'feature':>7} {'mean|Δf| [CI]':<22}{'Pearson r [CI]':<24}{'q':>9} {'Spearman':>8} "
        f"{'AUC':>6}{'q(MWU)':>9} {'attrib.':>8} {'rank attr':>9}"
    )
    for row in found.top(top).itertuples():
        typer.echo(
            f"{row.feature:>7} {row.mean_abs_delta:6.3f} [{row.mean_abs_delta_low:.3f}, {row.mean_abs_delta_high:.3f}]"
            f"{'':<2}{row.pearson_r:+.3f} [{row.pearson_low:+.3f}, {row.pearson_high:+.3f}]"
            f"{'':<2}{row.pearson_q:9.2e} {row.spearman_r:+8.3f} {row.auc:6.3f}{row.mwu_q:9.2e} "
            f"{row.attribution:+8.3f} {row.rank_attribution:>9}"
        )
    best = found.diffmean["top_features"][0]
    typer.echo(
        f"DiffMean direction (flip minus control Δresidual) at {found.hook}: norm {found.diffmean['norm']:.3f}; "
        f"closest SAE decoder row: feature {best['feature']} (cosine {best['cosine']:.3f})"
    )
    typer.echo("flip-vs-control AUC by layer (cross-validated DiffMean projection):")
    for row in found.layers:
        typer.echo(f"  {row['hook']:<28} {row['auc']:.3f} [{row['low']:.3f}, {row['high']:.3f}]")
    if found.ablation is not None:
        a = found.ablation
        typer.echo(
            f"attribution vs exact single-feature ablation on {len(a['features'])} features "
            f"({a['n_moving_features']} move at all): Spearman {a['spearman']:.3f} over features, "
            f"{a['spearman_cases']:.3f} over cases"
        )


def _load_model_and_sae(model: str | None, sae: str | None, sae_id: str | None, dtype: str, device: str):
    import torch

    from flipscope.model import HookedVLM
    from flipscope.organism import default_organism_dir
    from flipscope.sae import load_sae

    if dtype not in DTYPES:
        raise FlipscopeError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = model if model is not None else str(default_organism_dir())
    vlm = HookedVLM.from_pretrained(source, dtype=getattr(torch, dtype), device=device)
    return vlm, load_sae(sae if sae is not None else str(Path(source) / "sae"), sae_id, device=device)


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise FlipscopeError(f"{option} {text!r} is not a comma-separated list of integers") from err


@app.command()
def patch(
    flipbank: Path = typer.Option(..., help="FlipBank JSON (e.g. flipbank/organism/flipbank.json)."),
    features: str = typer.Option(..., help="SAE features to remove together, e.g. 38 or 38,32,0."),
    model: str | None = typer.Option(None, help="Model that made the FlipBank (default: the shipped organism)."),
    sae: str | None = typer.Option(None, help="SAE folder or sae-lens release (default: MODEL/sae)."),
    sae_id: str | None = typer.Option(None, help="SAE id within a sae-lens release."),
    positions: str = typer.Option("last", help="Where to patch: last (the paper's), question or all."),
    sweep: str | None = typer.Option(
        None, help="Also patch each of these features alone over every case (resumable), e.g. 0-49 or 3,38."
    ),
    out: Path | None = typer.Option(None, help="Output folder (default: <flipbank>.patch/ beside the FlipBank)."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device: cpu, cuda, ..."),
) -> None:
    """Remove features' contribution on the FlipBank's flips: margin recovered, flips reversed, controls."""
    import json

    from flipscope.flipbank import load_flipbank
    from flipscope.pairs import collect_pairs
    from flipscope.patching import POSITIONS, patch_bank, patch_sweep, summarize_patch
    from flipscope.sae import check_sae
    from flipscope.store import read_rows

    out = out or flipbank.with_name(f"{flipbank.stem}.patch")
    with _one_line_errors():
        if positions not in POSITIONS:
            raise FlipscopeError(f"positions {positions!r} is unknown; expected one of {POSITIONS}")
        chosen = _ints(features, "--features")
        swept = None
        if sweep:
            if "-" in sweep:
                low, high = _ints(sweep.replace("-", ","), "--sweep")
                swept = list(range(low, high + 1))
            else:
                swept = _ints(sweep, "--sweep")
        bank = load_flipbank(flipbank)
        vlm, dictionary = _load_model_and_sae(model, sae, sae_id, dtype, device)
        pairs = collect_pairs(vlm, bank, [check_sae(dictionary, vlm)])
        result = patch_bank(vlm, dictionary, bank, chosen, positions=positions, pairs=pairs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "patch.json").write_text(json.dumps({"summary": result.summary, "cases": result.rows}, indent=1) + "\n")
        if swept:
            store = patch_sweep(vlm, dictionary, bank, swept, out / "sweep.jsonl", pairs=pairs)
    s = result.summary
    typer.echo(
        f"removing features {chosen} at {s['setup']['hook']} ({positions} position(s)); 95% bootstrap CIs over cases"
    )
    flips = s["flips"]
    typer.echo(
        f"  flips ({flips['n']}): mean recovery {_fmt(flips['mean_recovery'])}, median {_fmt(flips['median_recovery'])}"
    )
    typer.echo(
        f"    recovered > 50%: {_fmt(flips['share_recovered_over_half'])}; "
        f"fully reversed: {_fmt(flips['share_reversed'])}"
    )
    for direction, block in s["by_direction"].items():
        typer.echo(
            f"    {direction} ({block['n']}): recovery {_fmt(block['mean_recovery'])}, "
            f"reversed {_fmt(block['share_reversed'])}"
        )
    if "controls" in s:
        c = s["controls"]
        typer.echo(
            f"  non-flip controls ({c['n']}): margin change {_fmt(c['mean_margin_change'])}, "
            f"|change| {_fmt(c['mean_abs_margin_change'])}"
        )
    if "matched_control_feature" in s:
        m = s["matched_control_feature"]
        typer.echo(
            f"  matched control feature {s['setup']['control_feature']}: recovery {_fmt(m['mean_recovery'])}, "
            f"reversed {_fmt(m['share_reversed'])}"
        )
    if swept:
        rows = [r for r in read_rows(store.path) if r["kind"] == "flip"]
        typer.echo("  each feature alone (flips): feature, mean recovery [CI], reversed")
        blocks = {f: summarize_patch([r for r in rows if r["variant"] == f])["flips"] for f in swept}
        ranked = sorted(swept, key=lambda f: -blocks[f]["mean_recovery"]["value"])
        for feature in ranked[:10]:
            block = blocks[feature]
            typer.echo(f"    {feature:>6} {_fmt(block['mean_recovery'])}  {block['share_reversed']['value']:.3f}")
    typer.echo(f"results: {out}")


@app.command()
def clamp(
    questions: Path = typer.Option(..., help="Questions JSONL to evaluate (e.g. flipbank/organism/questions.jsonl)."),
    features: str = typer.Option(..., help="SAE features to clamp, e.g. 38 or 38,32."),
    values: str = typer.Option("0", help="Clamp value(s); several give the trade-off curve, e.g. 0,1,2,4."),
    diffmean_from: Path | None = typer.Option(
        None,
        "--diffmean-from",
        help="FlipBank JSON: also ablate its DiffMean direction (flips vs controls, at the SAE's hook) for comparison.",
    ),
    model: str | None = typer.Option(None, help="Model (default: the shipped organism)."),
    sae: str | None = typer.Option(None, help="SAE folder or sae-lens release (default: MODEL/sae)."),
    sae_id: str | None = typer.Option(None, help="SAE id within a sae-lens release."),
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    conditions: str = typer.Option("image,blank", help="Image conditions, 'image' first: image, blank, none, swap."),
    out: Path = typer.Option(..., help="Output folder; rerunning resumes."),
    dtype: str = typer.Option("float32", help="Model dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device: cpu, cuda, ..."),
) -> None:
    """Evaluate with features clamped vs not: flip rate, accuracy, text-only agreement, paired tests."""
    import json

    from flipscope.clamp import DirectionAblatedVLM, compare_clamped
    from flipscope.features import diffmean_direction
    from flipscope.flipbank import load_flipbank
    from flipscope.pairs import collect_pairs
    from flipscope.questions import load_questions
    from flipscope.sae import check_sae
    from flipscope.sweep import EvalConfig

    with _one_line_errors():
        chosen = _ints(features, "--features")
        try:
            levels = [float(v) for v in values.split(",")]
        except ValueError as err:
            raise FlipscopeError(f"--values {values!r} is not a comma-separated list of numbers") from err
        cfg = EvalConfig(conditions=tuple(c.strip() for c in conditions.split(",")))
        loaded = load_questions(questions, images)
        bank = load_flipbank(diffmean_from) if diffmean_from is not None else None
        vlm, dictionary = _load_model_and_sae(model, sae, sae_id, dtype, device)
        also = {}
        if bank is not None:
            hook = check_sae(dictionary, vlm)
            direction = diffmean_direction(collect_pairs(vlm, bank, [hook], progress=False), hook)
            also["diffmean"] = DirectionAblatedVLM(vlm, hook, direction, name="DiffMean")
        clamps = [{f: v for f in chosen} for v in levels]
        report = compare_clamped(vlm, dictionary, loaded, clamps, out, cfg, also=also)
    (out / "clamp.json").write_text(json.dumps(report, indent=1) + "\n")
    _print_comparison(report)
    typer.echo(f"results: {out / 'clamp.json'}")


def _intervention_label(description: dict) -> str:
    if "clamp" in description:
        return ",".join(f"{f}={v:g}" for f, v in description["clamp"]["values"].items())
    if "ablate_direction" in description:
        return f"{description['ablate_direction']['name']} ablated"
    return "intervention"


def _print_comparison(report: dict) -> None:
    base = report["baseline"]["overall"]
    typer.echo(
        f"questions: {base['flip_rate']['n']}   (95% bootstrap CIs over questions; McNemar p for paired changes)"
    )
    typer.echo(f"{'model':<22}{'flip rate':<24}{'accuracy':<24}text-only agreement")
    typer.echo(
        f"{'as is':<22}{_fmt(base['flip_rate']):<24}{_fmt(base['accuracy']):<24}{_fmt(base['text_only_agreement'])}"
    )
    for entry in report["interventions"]:
        o = entry["summary"]["overall"]
        label = _intervention_label(entry["description"])
        typer.echo(f"{label:<22}{_fmt(o['flip_rate']):<24}{_fmt(o['accuracy']):<24}{_fmt(o['text_only_agreement'])}")
        for measure, p in entry["paired"].items():
            rel = f", {p['relative_change']:+.1%} relative" if p["relative_change"] is not None else ""
            typer.echo(
                f"    {measure.replace('_', ' ')}: change {_fmt(p['change'])}{rel}, McNemar p={p['mcnemar_p']:.2g}"
            )
        for strategy, block in entry["summary"]["by_strategy"].items():
            before = report["baseline"]["by_strategy"][strategy]
            typer.echo(
                f"    {strategy}: paraphrase flips {_fmt(before['paraphrase_flip_rate'])} -> "
                f"{_fmt(block['paraphrase_flip_rate'])}; "
                f"text-only agreement {_fmt(before['text_only_agreement'])} -> {_fmt(block['text_only_agreement'])}"
            )


organism_app = typer.Typer(help="Build and inspect model organisms.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@organism_app.command("build")
def organism_build(
    out: Path = typer.Option(..., help="Directory to write the organism to (model, processor, sae/, card)."),
    config: Path | None = typer.Option(
        None, help="JSON file of OrganismConfig fields; omitted fields keep their defaults."
    ),
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


@organism_app.command("flipbank")
def organism_flipbank(
    out: Path = typer.Option(..., help="Folder to write films, questions, evaluation and flipbank.json to."),
    organism: Path | None = typer.Option(None, help="Organism directory (default: the shipped organism)."),
    n_films: int = typer.Option(40, help="Held-out films to evaluate (4 questions each)."),
    min_margin: float = typer.Option(0.2, help="Keep flips whose two margins are both at least this far from 0."),
) -> None:
    """Evaluate held-out films of an organism and curate its FlipBank (what flipbank/organism holds)."""
    import json

    from flipscope.flipbank import CurationRules
    from flipscope.organism.bank import DEFAULT_RULES, build_flipbank

    rules = CurationRules(**{**DEFAULT_RULES.to_dict(), "min_margin": min_margin})
    try:
        path = build_flipbank(out, organism, n_films=n_films, rules=rules)
    except FlipscopeError as err:
        raise typer.BadParameter(str(err), param_hint="--organism") from err
    bank = json.loads(path.read_text())
    typer.echo(f"{bank['n_flips']} flip cases, {bank['n_controls']} controls: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("figures"), help="Folder for the figures, summary.json and report.html."),
    work: Path | None = typer.Option(None, help="Folder for the stages' resumable stores (default: OUT/work)."),
    organism: Path | None = typer.Option(None, help="Organism directory (default: the shipped organism)."),
    films: int = typer.Option(40, help="Held-out films to evaluate (4 questions each)."),
    png: bool = typer.Option(True, help="Also render PNGs (needs Chromium; skipped with a message if absent)."),
) -> None:
    """The main job: evaluate the organism, curate its FlipBank, discover, patch, clamp, and write the report."""
    from flipscope.demo import DemoConfig, run_demo

    with _one_line_errors():
        s = run_demo(out, work, organism=organism, cfg=DemoConfig(n_films=films), png=png, echo=typer.echo)
    o = s["evaluation"]["overall"]
    disc = s["patching"]["discovered"]
    c = s["clamping"]
    zero = c["interventions"][0]
    typer.echo(
        f"\nflip rate {_fmt(o['flip_rate'])}, accuracy {_fmt(o['accuracy'])}; "
        f"FlipBank {s['flipbank']['n_flips']} flips, {s['flipbank']['n_controls']} controls"
    )
    typer.echo(
        f"removing features {disc['setup']['features']}: recovery {_fmt(disc['flips']['mean_recovery'])}, "
        f"reversed {_fmt(disc['flips']['share_reversed'])}"
    )
    typer.echo(
        f"clamping feature {c['feature']} to {c['values'][0]:g}: flip rate "
        f"{_fmt(c['baseline']['overall']['flip_rate'])} -> {_fmt(zero['summary']['overall']['flip_rate'])}, "
        f"accuracy change {_fmt(zero['paired']['accuracy']['change'])}"
    )
    typer.echo(f"figures: {out}/*.html" + ("" if s["png_skipped"] else f", {out}/*.png"))
    typer.echo(f"report: {out / 'report.html'}")


def main() -> None:
    """The `flipscope` command: usage errors (a missing or malformed option, a path that does not
    exist) come out as one line that names the problem and the help to read, never a traceback."""
    import sys

    from typer._click import exceptions as usage  # typer 0.29 raises its vendored click's errors

    try:
        code = app(standalone_mode=False)
    except usage.NoArgsIsHelpError:  # the help is already printed
        code = 0
    except usage.UsageError as err:
        where = err.ctx.command_path if err.ctx else "flipscope"
        typer.echo(f"error: {err.format_message()} (see `{where} --help`)", err=True)
        code = err.exit_code
    except usage.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        code = err.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
