"""What every command shares: the app, one error policy, option parsing and model loading.

Nothing heavy is imported here: a command imports torch, transformers and the stages it runs
inside its own body, so `flipscope --help` answers at once."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from flipscope.errors import FlipscopeError
from flipscope.reporting.format import fmt

__all__ = [
    "ADAPTER_HELP",
    "DTYPES",
    "SHARD_HELP",
    "SITE_HELP",
    "TRACE_HELP",
    "app",
    "check_dtype",
    "echo_shard_done",
    "fmt",
    "ints",
    "load_model",
    "load_model_and_sae",
    "load_model_and_site",
    "echo_site",
    "one_line_errors",
    "organism_app",
    "shard_stores",
]

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names the --dtype options take


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a `FlipscopeError` (bad input: a path, a field, an option value) or an `OSError` (a
    file system that refuses a write) into one line on stderr and exit status 2."""
    try:
        yield
    except FlipscopeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    except OSError as err:  # a folder in the way, read-only, a full disk: the path and why, not a traceback
        where = f"{err.filename!r}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}", err=True)
        raise typer.Exit(2) from err


app = typer.Typer(
    help="flipscope: find why a medical VLM flips its yes/no answer under paraphrase.",
    epilog="Start with `flipscope demo` (the whole story on the shipped organism). On your own model: "
    "evaluate -> curate -> discover -> patch -> clamp; each command's --help says what it reads and writes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
organism_app = typer.Typer(help="Build and inspect model organisms.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        else:  # read when transformers is first imported; importing it here would slow every command
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def writable(path: Path, *, folder: bool, option: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written (a file where a folder goes or the
    reverse, a file in the way of a parent folder, a read-only place); creates nothing."""
    if folder and path.exists() and not path.is_dir():
        raise FlipscopeError(f"{option} {str(path)!r} is a file; expected a folder")
    if not folder and path.is_dir():
        raise FlipscopeError(f"{option} {str(path)!r} is a folder; expected a file name")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FlipscopeError(f"{option} {str(path)!r} cannot be made: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlipscopeError(f"{option} {str(path)!r} cannot be written: {str(probe)!r} is read-only")
    return path


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise FlipscopeError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


ADAPTER_HELP = "A PEFT (LoRA) adapter folder, merged into the model's weights."
MODEL_ADAPTER_HELP = (
    "path/to/file.py:Class or package.module:Class: your adapter for a model no family loads (custom code; "
    "see flipscope.model.adapter). flipscope never runs a checkpoint's remote code itself."
)
FAMILY_HELP = (
    "Model family (gemma3, gemma3_text, llava, qwen2_5_vl, generic; `flipscope families`); default: from the "
    "config's model_type."
)
SHARD_HELP = (
    "This process's part of the work: K/N by hand, auto (from torchrun/accelerate RANK/WORLD_SIZE, a SLURM array "
    "or srun tasks; the default under a launcher) or none. Launched shards go to OUT/shards/; torchrun's rank 0 "
    "merges them, a SLURM array's are merged by rerunning the command without the array or by `flipscope merge OUT`."
)


def echo_shard_done(launch, out: Path) -> None:
    """What to do after this process wrote its shard only."""
    if launch.launcher == "manual":
        typer.echo(f"shard {launch.rank}/{launch.world} done: {out}; join the shards with `flipscope merge`")
    else:
        typer.echo(
            f"shard {launch.rank} of {launch.world} ({launch.launcher}) done under {out / 'shards'}; when all are "
            f"done, rerun this command without the launcher (or `flipscope merge {out}`) to merge them"
        )


def shard_stores(folders: list[Path], name: str = "results.jsonl") -> list[Path]:
    """The shard stores `flipscope merge` joins: FOLDER/results.jsonl of each `--shard K/N` run, or
    every FOLDER/shards/K-of-N/results.jsonl a launch wrote under one --out."""
    from flipscope.experiments.sharded import left_shards

    stores: list[Path] = []
    for folder in folders:
        launched = left_shards(folder / name)
        if launched:
            missing = [str(p) for p in launched if not p.is_file()]
            if missing:
                raise FlipscopeError(f"shard(s) never started under {str(folder)!r}: {', '.join(missing)}")
            stores += launched
        else:
            stores.append(folder / name)
    return stores


def model_source(model: str | None) -> str:
    """What `from_pretrained` reads for MODEL: an organism (None: the default; a shipped name; a
    directory with a card) as its checkpoint, assembled first for one on a real base; else MODEL."""
    from flipscope.organism import SHIPPED, organism_checkpoint
    from flipscope.organism.build import CARD_NAME

    if model is None or model in SHIPPED or (Path(model) / CARD_NAME).is_file():
        return str(organism_checkpoint(model))
    return model


def load_model(model: str | None, dtype: str, device: str, adapter: Path | None = None):
    """The model (default: the shipped organism), with `adapter` merged in if given."""
    import torch

    from flipscope.model.hooked import HookedVLM

    check_dtype(dtype)
    source = model_source(model)
    return HookedVLM.from_pretrained(source, dtype=getattr(torch, dtype), device=device, adapter=adapter)


def load_any_model(
    model: str,
    dtype: str,
    device: str,
    *,
    adapter: Path | None = None,
    family: str | None = None,
    model_adapter: str | None = None,
):
    """A `HookedVLM` of MODEL (its family from the config unless given; `adapter` merged in), or the
    user's `--model-adapter` class built on MODEL."""
    import torch

    from flipscope.model.hooked import HookedVLM

    check_dtype(dtype)
    if model_adapter is not None:
        if adapter is not None or family is not None:
            raise FlipscopeError("--model-adapter loads the model its own way; drop --adapter and --family")
        from flipscope.model.adapter import load_model_adapter

        return load_model_adapter(model_adapter, model)
    return HookedVLM.from_pretrained(
        model_source(model), dtype=getattr(torch, dtype), device=device, adapter=adapter, family=family
    )


def load_model_and_sae(
    model: str | None, sae: str | None, sae_id: str | None, dtype: str, device: str, adapter: Path | None = None
):
    """The model (default: the shipped organism; `adapter` merged in) and its SAE (default: MODEL/sae)."""
    from flipscope.organism import SHIPPED, organism_dir
    from flipscope.sae.load import load_sae

    vlm = load_model(model, dtype, device, adapter)
    source = str(organism_dir(model)) if model is None or model in SHIPPED else model  # the SAE ships beside
    return vlm, load_sae(sae if sae is not None else str(Path(source) / "sae"), sae_id, device=device)


SITE_HELP = (
    "With --sae auto: where to look for SAEs, a folder (each subfolder one SAE; default: the model's folder, e.g. "
    "the organism's sae/ and sae_entry/) or a sae-lens release (e.g. gemma-scope-2-4b-it-att), or several, "
    "comma-separated."
)
TRACE_HELP = "With --sae auto: a trace JSON from `flipscope trace` (default: trace the bank's first 64 flips now)."


def load_model_and_site(
    model: str | None,
    sae: str | None,
    sae_id: str | None,
    saes: str | None,
    trace: Path | None,
    bank,
    dtype: str,
    device: str,
    adapter: Path | None = None,
):
    """`load_model_and_sae`, or with `sae == "auto"` the SAE nearest where the trace says the
    framing enters (`flipscope.experiments.sites`); returns the model, the SAE and the choice
    (None unless auto)."""
    if sae != "auto":
        return (*load_model_and_sae(model, sae, sae_id, dtype, device, adapter), None)
    import json

    from flipscope.experiments.sites import choose_site, folder_candidates, release_candidates
    from flipscope.organism import SHIPPED, organism_dir
    from flipscope.sae.load import load_sae

    if sae_id is not None:
        raise FlipscopeError("--sae auto chooses the SAE itself; drop --sae-id (or name one with --sae)")
    vlm = load_model(model, dtype, device, adapter)
    where = saes or str(organism_dir(model) if model is None or model in SHIPPED else model)
    candidates = []
    for part in [where] if Path(where).exists() else [p.strip() for p in where.split(",") if p.strip()]:
        is_folder = Path(part).exists() or "/" in part  # a release name has no slash
        candidates += folder_candidates(part) if is_folder else release_candidates(part)
    if trace is not None:
        try:
            summary = json.loads(trace.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FlipscopeError(f"--trace {str(trace)!r} is not a trace JSON from flipscope trace ({err})") from err
        if not isinstance(summary, dict) or "entry_layer" not in summary:
            raise FlipscopeError(f"--trace {str(trace)!r} has no entry_layer; write it with flipscope trace")
    else:
        from flipscope.experiments.upstream import trace_framing

        summary = trace_framing(vlm, bank, max_cases=64).summary()
    choice = choose_site(candidates, summary, vlm.n_layers)
    chosen = choice.chosen
    return vlm, load_sae(chosen.source, chosen.sae_id, device=device), choice


def echo_site(choice) -> None:
    """What `--sae auto` chose, why, and the mid-depth site beside it."""
    typer.echo(f"site: {choice.chosen.label} at {choice.chosen.hook}. {choice.reason}")
    if choice.mid_depth is not None:
        typer.echo(
            f"  the paper's mid-depth site has an SAE too ({choice.mid_depth.hook}: --sae {choice.mid_depth.source}"
            + (f" --sae-id {choice.mid_depth.sae_id}" if choice.mid_depth.sae_id else "")
            + "); compare the two with flipscope discover at each."
        )


def ints(text: str, option: str) -> list[int]:
    """A comma-separated list of integers, or a one-line error naming `option`."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise FlipscopeError(f"{option} {text!r} is not a comma-separated list of integers") from err
