"""The `flipscope` command."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import typer

from flipscope.errors import FlipscopeError

app = typer.Typer(
    help="flipscope: find why a medical VLM flips its yes/no answer under paraphrase.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_WORDS = ("yes", "no", "is", "there", "a", "an", "any", "effusion", "opacity", "the", "lungs", "clear", "?")


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
def demo(
    out: Path = typer.Option(None, help="Directory for the demo checkpoint (default: a temporary directory)."),
) -> None:
    """Score yes/no questions with and without the image on a small Gemma 3 VLM built here.

    The checkpoint is a randomly initialised Gemma3ForConditionalGeneration written with
    save_pretrained and loaded back through HookedVLM.from_pretrained, the path MedGemma takes.
    """
    from flipscope.model import HookedVLM
    from flipscope.prompts import PromptSpec
    from flipscope.tiny import TinyVLMConfig, save_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        directory = save_tiny_vlm(TinyVLMConfig(words=DEMO_WORDS), out or Path(tmp) / "tiny-gemma3-vlm")
        vlm = HookedVLM.from_pretrained(directory)
        film = np.random.default_rng(0).integers(0, 256, size=(48, 48), dtype=np.uint8)
        questions = ("Is there an effusion?", "Is there any effusion?", "Are the lungs clear?")
        specs = [PromptSpec(question=q, image=film, condition=c) for q in questions for c in ("image", "blank", "none")]
        batch = vlm.prompts.build(specs)
        margins = vlm.score(batch)
        _, cache = vlm.run_with_cache(
            batch, names_filter=f"blocks.{vlm.n_layers // 2}.hook_resid_post", positions="last"
        )
        typer.echo(f"model: {directory} ({vlm.n_layers} layers, d_model {vlm.d_model}, {len(vlm.hook_dict)} hooks)")
        typer.echo(f"{'question':<28}{'condition':<11}{'margin':>8}  answer")
        for spec, margin in zip(specs, margins.tolist(), strict=True):
            answer = "yes" if margin > 0 else "no"
            typer.echo(f"{spec.question:<28}{spec.condition:<11}{margin:>8.3f}  {answer}")
        for name, acts in cache.items():
            typer.echo(f"cached {name}: {tuple(acts.shape)} (last prompt position only)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
