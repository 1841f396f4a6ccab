"""The organism's FlipBank: held-out films evaluated with the image, curated by the paper's rules.

`build_flipbank` writes, into one folder, the films (`images/`), their questions
(`questions.jsonl`), the evaluation store (`evaluation/results.jsonl`, resumable) and
`flipbank.json`. The committed `flipbank/organism/` is this function's output with its defaults;
rerunning it reproduces the file.
"""

from __future__ import annotations

from pathlib import Path

from flipscope.data.curation import CurationRules, curate
from flipscope.data.flipbank import save_flipbank
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.organism.build import load_card
from flipscope.organism.config import OrganismConfig
from flipscope.organism.questions import export_questions

__all__ = ["DEFAULT_RULES", "N_FILMS", "build_flipbank"]

N_FILMS = 40
DEFAULT_RULES = CurationRules(min_margin=0.2, controls_per_flip=1, seed=0)


def build_flipbank(
    out: str | Path,
    organism: str | Path | None = None,
    *,
    n_films: int = N_FILMS,
    rules: CurationRules = DEFAULT_RULES,
    progress: bool = True,
) -> Path:
    """Export `n_films` held-out films of the organism, evaluate them with the image, curate by
    `rules` and write the FlipBank; returns the path of `flipbank.json`."""
    from flipscope.model.hooked import HookedVLM
    from flipscope.organism import organism_checkpoint, organism_dir

    directory = organism_dir(organism)
    cfg = OrganismConfig.from_dict(load_card(directory)["config"])
    out = Path(out)
    questions = load_questions(export_questions(cfg, out, n_films=n_films))
    vlm = HookedVLM.from_pretrained(organism_checkpoint(directory))
    store = run_sweep(
        vlm, questions, EvalConfig(conditions=("image",)), out / "evaluation" / "results.jsonl", progress=progress
    )
    bank = curate(iter_rows(store.path), questions, rules, source=read_header(store.path))
    return save_flipbank(bank, out / "flipbank.json")
