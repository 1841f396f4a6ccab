"""Commands that evaluate a model and curate its FlipBank: hooks, evaluate, merge, curate."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import (
    DTYPES,
    FAMILY_HELP,
    MODEL_ADAPTER_HELP,
    SHARD_HELP,
    app,
    echo_shard_done,
    fmt,
    load_any_model,
    one_line_errors,
    shard_stores,
    writable,
)
from flipscope.cli.options import Adapter, Dtype
from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError

CONDITIONS_HELP = (
    "Comma-separated evidence conditions, the evidence first: image, blank, none, swap for a VLM "
    "(default image,blank); context, none, swap for a text model (default context,none)."
)
SWAP_MATCH_HELP = (
    "What 'swap' shows: any other question's film, or opposite: a film of the same finding whose truth is the "
    "opposite (questions with none get no swap)."
)
RELIANCE_HELP = (
    "Condition that counts as 'image removed' for reliance: blank, none or swap (default: blank, else none)."
)


@app.command()
def hooks(
    model: str = typer.Argument(..., help="Hub id (e.g. google/medgemma-4b-it) or local model directory."),
    adapter: Adapter = None,
    family: str | None = typer.Option(None, help=FAMILY_HELP),
) -> None:
    """List the hook names of MODEL (the names SAE configs and run_with_cache use)."""
    from flipscope.model.hooked import HookedVLM

    try:
        vlm = HookedVLM.from_pretrained(model, adapter=adapter, family=family)
    except FlipscopeError as err:
        raise typer.BadParameter(str(err), param_hint="MODEL") from err
    for name in vlm.hook_dict:
        typer.echo(name)


@app.command()
def families() -> None:
    """List the model families flipscope runs: HF class, evidence, conditions, fast path, checkpoints."""
    from flipscope.model.families import FAMILIES

    for family in FAMILIES.values():
        row = family.describe()
        typer.echo(f"{row['family']}: {row['class']} ({row['evidence']}; conditions {', '.join(row['conditions'])})")
        typer.echo(f"    fast path {row['fast_path']}")
        typer.echo(f"    covers {row['covers']}")


@app.command()
def evaluate(
    model: str = typer.Option(..., help="Hub id (e.g. google/medgemma-4b-it) or local model directory."),
    questions: Path = typer.Option(..., help="Questions JSONL: id, image, finding, answer, question, paraphrases."),
    images: Path | None = typer.Option(
        None, help="Directory that relative image paths are resolved against (default: beside the questions file)."
    ),
    conditions: str | None = typer.Option(None, help=CONDITIONS_HELP),
    blank: str = typer.Option("gray", help="What 'blank' shows: gray, white or noise (mean 128, sd 64)."),
    swap_match: str = typer.Option("any", help=SWAP_MATCH_HELP),
    batch_size: int = typer.Option(32, min=1, help="Prompts per forward pass."),
    out: Path = typer.Option(..., help="Output directory; rerunning the same command resumes what is there."),
    dtype: Dtype = "float32",
    device: str = typer.Option("cpu", help="Device: cpu, cuda, cuda:1, ..."),
    generate_tokens: int = typer.Option(
        0, help="Also generate this many tokens per prompt and keyword-parse them, as the paper does (0: off)."
    ),
    answers: str = typer.Option(
        "margin", help="Answers the summary uses: margin (its sign) or generated (parsed text)."
    ),
    reliance: str | None = typer.Option(None, help=RELIANCE_HELP),
    shard: str | None = typer.Option(None, help=SHARD_HELP),
    adapter: Adapter = None,
    family: str | None = typer.Option(None, help=FAMILY_HELP),
    model_adapter: str | None = typer.Option(None, help=MODEL_ADAPTER_HELP),
) -> None:
    """Score every question and paraphrase under each evidence condition; print flips and quadrants."""
    from flipscope.data.questions import load_questions
    from flipscope.experiments.evaluation import run_sweep
    from flipscope.experiments.launch import resolve_shard
    from flipscope.experiments.sharded import run_sharded

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    with one_line_errors():
        writable(out, folder=True)
        options = {"blank": blank, "batch_size": batch_size, "generate_tokens": generate_tokens}
        options["swap_match"] = swap_match
        checks = (answers, reliance)
        if conditions is None and reliance not in ("blank", "none"):  # in neither default (image,blank; context,none)
            _check_answers(answers, generate_tokens, reliance, ("image", "blank"))
        cfg = _config(conditions, options, checks) if conditions is not None else None  # fail before any load
        launch = resolve_shard(shard)
        loaded = load_questions(questions, images)
        device = launch.device(device) if launch is not None else device
        vlm = load_any_model(model, dtype, device, adapter=adapter, family=family, model_adapter=model_adapter)
        if cfg is None:
            text = getattr(getattr(vlm, "family", None), "evidence", "") == "text"
            cfg = _config("context,none" if text else "image,blank", options, checks)
        path = run_sharded(
            lambda part, where: run_sweep(vlm, loaded, cfg, where, shard=part), out / "results.jsonl", launch
        )
    if path is None:
        echo_shard_done(launch, out)
        return
    if launch is None or launch.is_main:
        _write_summary(path, out, reliance=reliance, source=answers)


def _config(conditions: str, options: dict, checks: tuple[str, str | None]):
    from flipscope.experiments.evaluation import EvalConfig

    cfg = EvalConfig(conditions=tuple(c.strip() for c in conditions.split(",")), **options)
    _check_answers(checks[0], cfg.generate_tokens, checks[1], cfg.conditions)
    return cfg


def _check_answers(answers: str, generate_tokens: int, reliance: str | None, conditions: tuple[str, ...]) -> None:
    if answers not in ("margin", "generated"):
        raise FlipscopeError(f"--answers {answers!r} is not 'margin' or 'generated'")
    if answers == "generated" and not generate_tokens:
        raise FlipscopeError("--answers generated needs --generate-tokens > 0")
    if reliance is not None and reliance not in conditions:
        raise FlipscopeError(f"--reliance {reliance!r} is not among the evaluated conditions {list(conditions)}")


@app.command()
def summarize(
    results: Path = typer.Argument(
        ..., help="A results.jsonl, or the folder that holds it (evaluate, merge or import-answers wrote it)."
    ),
    reliance: str | None = typer.Option(
        None, help="Condition that counts as 'image removed': blank, none or swap (default: blank, else none)."
    ),
    answers: str = typer.Option("margin", help="Answers to use: margin (its sign) or generated (parsed text)."),
) -> None:
    """Flip rate, accuracy, quadrants and per-family flip rates of a store, written beside it as summary.json."""
    store = results / "results.jsonl" if results.is_dir() else results
    _write_summary(store, store.parent, reliance=reliance, source=answers)


@app.command()
def merge(
    shards: list[Path] = typer.Argument(
        ...,
        help="Output folders of `flipscope evaluate --shard K/N`, all N of them, or the one --out of a launch "
        "whose ranks or array tasks wrote its shards/ folder.",
    ),
    out: Path = typer.Option(..., help="Directory for the merged results.jsonl and summary.json."),
) -> None:
    """Join shard results into the store a single process would have written, and summarize it."""
    from flipscope.experiments.shards import merge_shards

    with one_line_errors():
        writable(out, folder=True)
        store = merge_shards(shard_stores(shards), out / "results.jsonl")
    _write_summary(store.path, out)


@app.command()
def repair(
    store: Path = typer.Argument(..., help="A damaged results.jsonl (evaluate, merge or a patch sweep wrote it)."),
) -> None:
    """Keep every intact unit of a damaged store (the damaged file is kept as STORE.damaged); rerun
    the command that wrote it to recompute only what was dropped."""
    from flipscope.data.store import repair_store

    with one_line_errors():
        report = repair_store(store)
    typer.echo(f"kept {report['kept']} intact unit(s); dropped: {'; '.join(report['dropped']) or 'nothing'}")
    typer.echo(f"the damaged file is kept as {report['backup']}; rerun the command that wrote {store} to finish it")


def _write_summary(rows_path: Path, out: Path, *, reliance: str | None = None, source: str = "margin") -> None:

    from flipscope.data.store import iter_rows
    from flipscope.experiments.summary import summarize

    with one_line_errors():
        summary = summarize(iter_rows(rows_path), removed=reliance, source=source)
        write_json(out / "summary.json", summary)
    _print_summary(summary)
    if all(block["n_questions"] == 0 for block in summary["by_quadrant"].values()):
        typer.echo("quadrants: unavailable (no image-removed condition, so image reliance is unknown)")
    typer.echo(f"rows: {rows_path}\nsummary: {out / 'summary.json'}")


def _print_summary(summary: dict) -> None:
    overall = summary["overall"]
    typer.echo(f"questions: {overall['n_questions']}   (95% bootstrap CIs over questions)")
    for key in ("flip_rate", "pairwise_disagreement", "accuracy", "text_only_agreement", "swap_sensitivity"):
        typer.echo(f"  {key.replace('_', ' '):<24}{fmt(overall[key])}")
    w = max([18, *map(len, summary["by_finding"]), *map(len, summary["by_strategy"])]) + 2  # PSF-Med's long names
    typer.echo(f"{'finding':<{w}}{'n':>5}  flip rate")
    for name, block in summary["by_finding"].items():
        typer.echo(f"{name:<{w}}{block['n_questions']:>5}  {fmt(block['flip_rate'])}")
    typer.echo(f"{'strategy':<{w}}{'n':>5}  paraphrase flip rate")
    for name, block in summary["by_strategy"].items():
        typer.echo(f"{name:<{w}}{block['n_paraphrases']:>5}  {fmt(block['paraphrase_flip_rate'])}")
    cells = {name: (fmt(b["share"]), fmt(b["accuracy"])) for name, b in summary["by_quadrant"].items()}
    share, accuracy = (max(24, *(len(c[k]) + 2 for c in cells.values())) for k in (0, 1))  # a long CI note
    typer.echo(f"{'quadrant':<12}{'n':>5}  {'share':<{share}}{'accuracy':<{accuracy}}entropy (bits)")
    for name, block in summary["by_quadrant"].items():
        typer.echo(
            f"{name:<12}{block['n_questions']:>5}  {cells[name][0]:<{share}}{cells[name][1]:<{accuracy}}"
            f"{fmt(block['mean_entropy_bits'])}"
        )


@app.command()
def curate(
    results: Path = typer.Option(..., help="Output directory of `flipscope evaluate` (holds results.jsonl)."),
    questions: Path = typer.Option(..., help="The questions JSONL that evaluation ran on."),
    images: Path | None = typer.Option(None, help="Directory for relative image paths (default: beside questions)."),
    out: Path = typer.Option(..., help="FlipBank file to write (e.g. flipbank/mymodel/flipbank.json)."),
    min_margin: float = typer.Option(
        0.0, min=0, help="Keep flips whose two margins are both at least this far from 0."
    ),
    use_generated: bool = typer.Option(
        False, help="Flip on the keyword-parsed generated answers (both must parse without hedges)."
    ),
    min_similarity: float | None = typer.Option(
        None, help="Keep paraphrases with similarity >= this (rows must carry a 'similarity' value)."
    ),
    controls_per_flip: int = typer.Option(1, min=0, help="Non-flip controls drawn per flip."),
    match: str = typer.Option(
        "family",
        help="Per flip, a non-flip of the same paraphrase family and finding (family: what discovery needs to "
        "tell the framing from the answer), or any non-flip of the flipped questions (question).",
    ),
    seed: int = typer.Option(0, help="Seed of the control draw."),
    allow_edited_questions: bool = typer.Option(
        False,
        "--allow-edited-questions",
        help="Curate even if the questions changed since the evaluation (both digests are recorded in the FlipBank).",
    ),
) -> None:
    """Curate a FlipBank (flip cases + matched non-flip controls) from an evaluation."""
    from flipscope.data.curation import CurationRules
    from flipscope.data.curation import curate as curate_bank
    from flipscope.data.flipbank import save_flipbank
    from flipscope.data.questions import load_questions
    from flipscope.data.store import iter_rows, read_header
    from flipscope.experiments.evaluation import questions_fingerprint

    with one_line_errors():
        writable(out, folder=False)
        rules = CurationRules(
            min_margin=min_margin,
            use_generated=use_generated,
            min_similarity=min_similarity,
            controls_per_flip=controls_per_flip,
            seed=seed,
            match=match,
        )
        store = results / "results.jsonl" if results.is_dir() else results
        if not store.is_file():
            raise FlipscopeError(f"{str(store)!r} does not exist; pass the output directory of `flipscope evaluate`")
        loaded = load_questions(questions, images)
        bank = curate_bank(
            iter_rows(store), loaded, rules, source=read_header(store),
            questions_sha256=questions_fingerprint(loaded), allow_edited_questions=allow_edited_questions,
        )  # fmt: skip
        path = save_flipbank(bank, out)
    directions = sorted({c["direction"] for c in bank["flips"]})
    counts = ", ".join(f"{sum(c['direction'] == d for c in bank['flips'])} {d}" for d in directions)
    typer.echo(f"{bank['n_flips']} flip cases ({counts}), {bank['n_controls']} controls: {path}")
    if bank.get("control_shortfall"):
        typer.echo(f"{bank['control_shortfall']} flip(s) have no non-flip control of their own family and finding")


@app.command()
def export(
    results: Path = typer.Argument(..., help="A results.jsonl, or the output directory that holds it."),
    parquet: Path = typer.Option(..., help="Parquet file to write (for pandas, polars or duckdb)."),
) -> None:
    """Export a result store's rows to Parquet, streamed unit by unit (needs pyarrow)."""
    from flipscope.data.export import export_parquet

    with one_line_errors():
        path = export_parquet(results / "results.jsonl" if results.is_dir() else results, parquet)
    typer.echo(f"rows: {path}")
