"""`flipscope trace`: where along the depth and the prompt the framing enters."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flipscope.cli.common import app, fmt, ints, load_model, one_line_errors, writable
from flipscope.cli.options import Adapter, BankModel, Device, Dtype, Flipbank
from flipscope.data.atomic import write_json
from flipscope.errors import FlipscopeError
from flipscope.reporting.claims import framing_entry, framing_heads


@app.command()
def trace(
    flipbank: Flipbank,
    model: BankModel = None,
    layers: str | None = typer.Option(None, help="Layers to restore, e.g. 0,8,17 (default: all)."),
    max_cases: int = typer.Option(64, min=0, help="Flips traced (the bank's first ones); 0 for all."),
    heads: bool = typer.Option(
        False, "--heads", help="Also trace each attention head at the last position, at the layers before the entry."
    ),
    head_layers: str | None = typer.Option(
        None,
        help="Layers whose heads --heads traces, e.g. 0-3 (default: those before the entry layer; all where the trace "
        "names none; none where the framing words do not explain the shift).",
    ),
    batch_size: int = typer.Option(16, min=1, help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, help="Output JSON (default: <flipbank>.trace.json beside the FlipBank)."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Corrupt each flip's framing words and restore the clean run layer by layer, position group by
    group: where the framing enters, and which words carry it; with --heads, which attention heads
    move it to the answer position."""
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.heads import heads_before_entry
    from flipscope.experiments.upstream import trace_framing

    with one_line_errors():
        path = writable(out or flipbank.with_name(f"{flipbank.stem}.trace.json"), folder=False)
        if head_layers and not heads:
            raise FlipscopeError("--head-layers needs --heads")
        bank = load_flipbank(flipbank)
        vlm = load_model(model, dtype, device, adapter)
        layer_ids = _layers(layers, "--layers", vlm.n_layers)
        chosen = _layers(head_layers, "--head-layers", vlm.n_layers)
        traced = trace_framing(vlm, bank, layers=layer_ids, max_cases=max_cases or None, batch_size=batch_size)
        summary = traced.summary()
        if heads:
            kwargs = {"max_cases": max_cases or None, "batch_size": batch_size}
            summary["heads"] = heads_before_entry(vlm, bank, summary, chosen, **kwargs)
        write_json(path, summary)
    typer.echo(f"{summary['n_cases']} flips traced; skipped: {json.dumps(summary['skipped'])}")
    if summary["effect"] is not None:
        effect = fmt(summary["effect"])
        typer.echo(f"corrupting their framing words moves the margin by {effect} logits; the share restored:")
    groups = summary["groups"]
    typer.echo(f"{'layer':>5}  " + "".join(f"{g:>26}" for g in groups))
    for row in summary["profile"]:
        typer.echo(f"{row['layer']:>5}  " + "".join(f"{fmt(row[g]):>26}" for g in groups))
    for word, estimate in list(summary["words"].items())[:8]:
        typer.echo(f"  corrupting '{word}' alone undoes {fmt(estimate)} of the margin shift")
    typer.echo(framing_entry(summary))
    _print_entry_site(summary, path)
    if heads:
        _print_heads(summary["heads"])
    typer.echo(f"trace: {path}")


def _print_entry_site(summary: dict, path: Path) -> None:
    """The hook the trace names (what `--sae auto` reads) and how to get an SAE there."""
    site, entry = summary.get("entry_site"), summary.get("entry_layer")
    if site is None:
        return
    layers = summary["layers"]
    before = layers[layers.index(entry) - 1] if layers.index(entry) else -1  # -1: the embeddings
    skipped = f"layer {before + 1}" if entry - before == 2 else f"layers {before + 1}–{entry - 1}"
    gap = "" if entry - before == 1 else f" (the traced layers skip {skipped}: trace them too to place it exactly)"
    typer.echo(
        f"entry site: {site} at the answer position{gap}. An SAE there: flipscope sae train --hook {site}; then "
        f"flipscope discover --sae auto --trace {path} picks it."
    )


def _layers(text: str | None, option: str, n_layers: int) -> list[int] | None:
    """The layers `option` names (None when not given), each checked against the model's."""
    if not text:
        return None
    layer_ids = ints(text, option)
    bad = [layer for layer in layer_ids if not 0 <= layer < n_layers]
    if bad:
        raise FlipscopeError(f"{option} {bad}: the model has layers 0..{n_layers - 1}")
    return layer_ids


def _print_heads(heads: dict) -> None:
    """Per traced layer, all heads' share, each head's restored and removed shares and attention on the
    framing words from the answer position; the reading."""
    typer.echo(f"{'head':>6}  {'restored alone [CI]':<28}{'removed alone [CI]':<28}attention on framing words")
    for row in heads["layers"]:
        if row["all heads"] is not None:
            typer.echo(f"{row['layer']:>4}.*  {fmt(row['all heads']):<28}(all of layer {row['layer']}'s heads)")
        for head in row["heads"]:
            name = f"{row['layer']}.{head['head']}"
            on = fmt(head["looks"]["framing words"])
            typer.echo(f"{name:>6}  {fmt(head['restored']):<28}{fmt(head['removed']):<28}{on}")
    typer.echo(framing_heads(heads))


@app.command()
def lens(
    flipbank: Flipbank,
    model: BankModel = None,
    layers: str | None = typer.Option(None, help="Layers to read, e.g. 0,8,16,17 (default: all)."),
    sites: str | None = typer.Option(
        None, help="Extra hooks to rank-1 patch, e.g. blocks.0.hook_attn_out (each layer's resid_post always)."
    ),
    n_random: int = typer.Option(
        32,
        min=1,
        help="The null is the best of this many norm-matched random directions (its expectation, from 8× as many).",
    ),
    out: Path | None = typer.Option(None, help="Output JSON (default: <flipbank>.lens.json beside the FlipBank)."),
    dtype: Dtype = "float32",
    device: Device = "cpu",
    adapter: Adapter = None,
) -> None:
    """Logit lens per layer (flips' divergence against same-family non-flips, the commit layer) and
    rank-1 patching of one cross-fitted framing direction per site, beside random directions."""
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.control_bound import non_flip_wording
    from flipscope.experiments.lens import lens_trajectory
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.rank1 import rank1_sweep
    from flipscope.model.hook_names import resid_post

    with one_line_errors():
        path = writable(out or flipbank.with_name(f"{flipbank.stem}.lens.json"), folder=False)
        bank = load_flipbank(flipbank)
        vlm = load_model(model, dtype, device, adapter)
        layer_ids = ints(layers, "--layers") if layers else list(range(vlm.n_layers))
        bad = [layer for layer in layer_ids if not 0 <= layer < vlm.n_layers]
        if bad:
            raise FlipscopeError(f"--layers {bad}: the model has layers 0..{vlm.n_layers - 1}")
        extra = [s.strip() for s in sites.split(",") if s.strip()] if sites else []
        for hook in extra:
            vlm.check_hook_name(hook)
        hooks = [*extra, *(resid_post(layer) for layer in layer_ids)]
        pairs = collect_pairs(vlm, bank, hooks)
        trajectory = lens_trajectory(vlm, bank, layers=layer_ids, pairs=pairs).summary()
        wording = non_flip_wording(vlm, bank)
        patched = rank1_sweep(vlm, bank, hooks, pairs=pairs, n_random=n_random, wording=wording)
        write_json(path, {"lens": trajectory, "rank1": patched})
    _print_lens(trajectory)
    _print_rank1(patched, n_random)
    typer.echo(f"lens: {path}")


def _print_lens(trajectory: dict) -> None:
    """The lens table: per layer, the divergences, their ratio, and the ratio selection alone gives."""
    typer.echo(f"{trajectory['n_flips']} flips, {trajectory['n_controls']} same-family non-flips")
    typer.echo(
        f"{'layer':>5}  {'|Δ lens| flips':>15}{'non-flips':>11}  {'ratio [CI]':<28}{'r(flip)':>8}"
        f"{'by selection':>14}{'p':>7}"
    )
    for row in trajectory["layers"]:
        ratio = fmt(row.get("ratio"), 2) if row.get("ratio") else "n/a"
        controls = f"{row['controls']:.3f}" if row["controls"] is not None else "n/a"
        r = f"{row['r_flip']:+.2f}" if "r_flip" in row else "n/a"
        null = row.get("selection")
        chosen = f"{null['ratio']:>14.2f}{null['p_value']:>7.3f}" if null else f"{'n/a':>14}{'':>7}"
        typer.echo(f"{row['layer']:>5}  {row['flips']:>15.3f}{controls:>11}  {ratio:<28}{r:>8}{chosen}")
    commit = trajectory["commit_layer"]
    typer.echo(f"commit layer (median over flips' paraphrases): {commit['median']} (n = {commit['n']})")


def _print_rank1(patched: list[dict], n_random: int) -> None:
    """The rank-1 table: per site, the recovery beside the best of `n_random` random directions, and
    the non-flips' |Δm| judged against their own wording's (`flipscope.experiments.control_bound`)."""
    typer.echo(f"{'site':<28}{'rank-1 recovery [CI]':<30}{f'best of {n_random} random':>20}{'p':>8}"
               f"{'non-flips |Δm|':>16}  vs their wording")  # fmt: skip
    own = None
    for row in patched:
        controls = row.get("controls", {})
        value = controls.get("mean_abs_margin_change", {}).get("value")
        shown = f"{value:.3f}" if value is not None else "n/a"
        bound = controls.get("wording_bound")
        own = bound["wording"] if bound else own
        null = row["random"]
        typer.echo(
            f"{row['hook']:<28}{fmt(row['recovery']):<30}{null['best_mean_recovery']:>20.3f}{null['p_value']:>8.3f}"
            f"{shown:>16}  {bound['verdict'] if bound else 'n/a'}"
        )
    typer.echo(f"(best of {n_random}: its expected value over {patched[0]['random']['n_drawn']} drawn directions; "
               "p: the share of them that recover as much)" if patched else "")  # fmt: skip
    if own is not None:
        typer.echo(
            f"(their wording: corrupting the non-flips' own framing words moves them by {fmt(own)}; within: the "
            "direction moves them less, as much: more by a paired difference whose CI reaches 0, beyond: more)"
        )
