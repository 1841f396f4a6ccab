"""The `patch` command: remove features' contribution on a FlipBank's flips, with its controls,
and optionally sweep features one at a time into a resumable store."""

from __future__ import annotations

from pathlib import Path

import typer

from flipscope.cli.common import (
    SHARD_HELP,
    app,
    echo_shard_done,
    echo_site,
    fmt,
    ints,
    load_model_and_site,
    one_line_errors,
    writable,
)
from flipscope.cli.features import DISCOVERY_HELP, feature_request, features_help, resolve_features
from flipscope.cli.options import Adapter, BankModel, Device, Dtype, Flipbank, SaeId, Saes, SiteSae, Trace
from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.reporting.claims import wording_bound_reading

BOUND_HELP = (
    "Judge the non-flips' margin change against how far corrupting their own framing words moves them "
    "(two forwards per non-flip)."
)
COUNT_HELP = (
    "Also remove the first 1, 2, ..., n of FEATURES together (in the order given, e.g. discover's ranking), each "
    "beside as many matched control features (resumable, count.jsonl): how many of them the flips need."
)
POSITIONS_HELP = (
    "Where to patch: last (the paper's), question (each token to the original question's mean) or all (the "
    "question and the template's tail after it, the last position included)."
)
ROWS_HELP = (
    "The --sweep's last-token rows per forward (prompt × feature): each holds a copy of its prompt's key/value "
    "cache, so this bounds the sweep's memory."
)


@app.command()
def patch(
    flipbank: Flipbank,
    features: str = typer.Option(..., help=features_help("remove together")),
    discovery: Path | None = typer.Option(
        None, help=DISCOVERY_HELP + " Default: <flipbank>.features.json beside the FlipBank."
    ),
    model: BankModel = None,
    sae: SiteSae = None,
    sae_id: SaeId = None,
    saes: Saes = None,
    trace: Trace = None,
    positions: str = typer.Option("last", help=POSITIONS_HELP),
    sweep: str | None = typer.Option(
        None, help="Also patch each of these features alone over every case (resumable), e.g. 0-49 or 3,38."
    ),
    out: Path | None = typer.Option(None, help="Output folder (default: <flipbank>.patch/ beside the FlipBank)."),
    batch_size: int = typer.Option(32, min=1, help="Prompts per forward pass (caching the pairs, patching)."),
    rows_per_forward: int = typer.Option(1024, min=1, help=ROWS_HELP),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
    shard: str | None = typer.Option(None, help="The --sweep's part this process runs. " + SHARD_HELP),
    wording_bound: bool = typer.Option(True, help=BOUND_HELP),
    count: bool = typer.Option(False, "--count", help=COUNT_HELP),
) -> None:
    """Remove features' contribution on the FlipBank's flips: margin recovered, flips reversed, controls."""

    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.launch import resolve_shard
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.sae.load import check_sae

    out = out or flipbank.with_name(f"{flipbank.stem}.patch")
    with one_line_errors():
        writable(out, folder=True)
        request, swept = _patch_features(positions, features, sweep, count)
        launch = resolve_shard(shard)
        main = launch is None or launch.is_main
        bank = load_flipbank(flipbank)
        device = launch.device(device) if launch is not None else device
        vlm, dictionary, site = load_model_and_site(model, sae, sae_id, saes, trace, bank, dtype, device, adapter)
        ranked = discovery or flipbank.with_name(f"{flipbank.stem}.features.json")
        chosen = resolve_features(request, ranked, dictionary)
        pairs = collect_pairs(vlm, bank, [check_sae(dictionary, vlm)], batch_size=batch_size)
        sizes = {"batch_size": batch_size, "rows_per_forward": rows_per_forward}
        if main:
            result = _patch_main(vlm, dictionary, bank, chosen, pairs, site, out, positions, wording_bound, batch_size)
            counted = _count(vlm, dictionary, bank, chosen, pairs, out, sizes) if count else None
        path = _sweep(vlm, dictionary, bank, swept, pairs, out, launch, sizes) if swept else None
    if not main:
        return
    _print_patch(result.summary, chosen, positions, site)
    if counted is not None:
        _print_count(counted)
    if swept and path is not None:
        _print_sweep(path, swept)
    elif swept:
        echo_shard_done(launch, out)
    typer.echo(f"results: {out}")


def _sweep(vlm, dictionary, bank, swept: list[int], pairs, out: Path, launch, sizes: dict) -> Path | None:
    """The --sweep over every case, this process's part of it (`run_sharded`)."""
    from flipscope.experiments.sharded import run_sharded
    from flipscope.experiments.sweeps import patch_sweep

    def part_of(part, where):
        return patch_sweep(vlm, dictionary, bank, swept, where, pairs=pairs, shard=part, **sizes)

    return run_sharded(part_of, out / "sweep.jsonl", launch, manual_in_place=False)


def _count(vlm, dictionary, bank, chosen: list[int], pairs, out: Path, sizes: dict) -> dict:
    """The --count sweep (resumable, count.jsonl), its summary written beside it as count.json."""
    from flipscope.experiments.feature_count import count_features

    return count_features(vlm, dictionary, bank, chosen, out / "count.jsonl", pairs=pairs, **sizes)


def _patch_main(vlm, dictionary, bank, chosen: list[int], pairs, site, out: Path, positions: str, bound: bool,
                batch_size: int):  # fmt: skip
    """The patch of `chosen` together, written to patch.json (with the site chosen, if any)."""
    from flipscope.experiments.control_bound import non_flip_wording
    from flipscope.experiments.patching import patch_bank

    wording = non_flip_wording(vlm, bank, batch_size) if bound else None
    result = patch_bank(
        vlm, dictionary, bank, chosen, positions=positions, pairs=pairs, batch_size=batch_size, wording=wording
    )
    chosen_site = {} if site is None else {"site": site.to_dict()}
    write_json(out / "patch.json", {"summary": result.summary, "cases": result.rows, **chosen_site})
    return result


def _patch_features(
    positions: str, features: str, sweep: str | None, count: bool = False
) -> tuple[list[int] | int, list[int] | None]:
    """The features patched together (or framing:K's K) and those swept alone, after checking `positions`."""
    from flipscope.experiments.patching import POSITIONS

    if positions not in POSITIONS:
        raise FlipscopeError(f"positions {positions!r} is unknown; expected one of {POSITIONS}")
    if count and positions != "last":
        raise FlipscopeError(f"--count patches the last position; got --positions {positions}")
    return feature_request(features), (_feature_list(sweep) if sweep else None)


def _feature_list(text: str) -> list[int]:
    """`0-49` (a range, both ends included) or `3,38`."""
    if "-" in text:
        ends = ints(text.replace("-", ","), "--sweep")
        if len(ends) != 2 or not 0 <= ends[0] <= ends[1]:
            raise FlipscopeError(f"--sweep {text!r}: expected a range LOW-HIGH with 0 <= LOW <= HIGH, or a list 3,38")
        return list(range(ends[0], ends[1] + 1))
    chosen = ints(text, "--sweep")
    if not chosen:
        raise FlipscopeError(f"--sweep {text!r} names no feature")
    return chosen


def _print_patch(s: dict, chosen: list[int], positions: str, site=None) -> None:
    if site is not None:
        echo_site(site)
    typer.echo(
        f"removing features {chosen} at {s['setup']['hook']} ({positions} position(s)); 95% bootstrap CIs over cases"
    )
    flips = s["flips"]
    typer.echo(
        f"  flips ({flips['n']}): mean recovery {fmt(flips['mean_recovery'])}, median {fmt(flips['median_recovery'])}"
    )
    typer.echo(
        f"    recovered > 50%: {fmt(flips['share_recovered_over_half'])}; "
        f"fully reversed: {fmt(flips['share_reversed'])}"
    )
    for direction, block in s["by_direction"].items():
        typer.echo(
            f"    {direction} ({block['n']}): recovery {fmt(block['mean_recovery'])}, "
            f"reversed {fmt(block['share_reversed'])}"
        )
    if "controls" in s:
        c = s["controls"]
        typer.echo(
            f"  non-flip controls ({c['n']}): margin change {fmt(c['mean_margin_change'])}, "
            f"|change| {fmt(c['mean_abs_margin_change'])}"
        )
        if "wording_bound" in c:
            typer.echo(f"    {wording_bound_reading(c['wording_bound'])}")
    if "matched_control_feature" in s:
        m = s["matched_control_feature"]
        typer.echo(
            f"  matched control features {s['setup']['control_features']} (own Δf, a push "
            f"{s['setup']['control_size_ratio']:.2f}× the features'): recovery {fmt(m['mean_recovery'])}, "
            f"reversed {fmt(m['share_reversed'])}"
        )
    if "same_push_control" in s:
        typer.echo(
            f"  the features' push along the controls' rows: recovery {fmt(s['same_push_control']['mean_recovery'])}"
        )
    if s["setup"].get("no_control"):
        typer.echo(f"  no matched control feature: {s['setup']['no_control']}")


def _print_sweep(path: Path, swept: list[int]) -> None:
    from flipscope.data.store import iter_rows
    from flipscope.experiments.patching import summarize_patch

    rows = [r for r in iter_rows(path) if r["kind"] == "flip"]
    typer.echo("  each feature alone (flips): feature, mean recovery [CI], reversed")
    blocks = {f: summarize_patch([r for r in rows if r["variant"] == f])["flips"] for f in swept}
    ranked = sorted(swept, key=lambda f: -blocks[f]["mean_recovery"]["value"])
    for feature in ranked[:10]:
        block = blocks[feature]
        typer.echo(f"    {feature:>6} {fmt(block['mean_recovery'])}  {block['share_reversed']['value']:.3f}")


def _print_count(summary: dict) -> None:
    typer.echo(f"  the first k features removed together at {summary['hook']}: k, flips' recovery [CI], "
               "as many matched controls, non-flips' margin change")  # fmt: skip
    for c in summary["counts"]:
        control, moved = c.get("matched_control_feature"), c.get("controls")
        control = "—" if control is None else format(control["mean_recovery"]["value"], "+.3f")
        moved = "—" if moved is None else format(moved["mean_margin_change"]["value"], "+.3f")
        typer.echo(f"    {c['k']:>3} {fmt(c['flips']['mean_recovery'])}  {control:>7}  {moved:>7}")
    typer.echo(f"  {summary['needed']['reading']}")
