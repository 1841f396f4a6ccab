"""The demo's stage for an organism on a real base: the same analysis on the base language model
alone, before any fine-tuning, reading each film's one-sentence report instead of the film.

The organism's flips could come from the fine-tuning; the base model's come from pretraining
only. Its questions are the demo's films and wordings with the report as `context`
(`export_questions(report=True)`), evaluated with the report and with nothing; its FlipBank is
curated by the same rules; discovery, patching and held-out replication run with the
organism's SAE, whose fit to the base model's activations (FVU on the bank's prompts) is
reported beside them, since the SAE was trained on the fine-tuned model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_json

__all__ = ["base_text_analysis"]


def _sae_fit(sae: Any, pairs: Any, hook: str) -> float:
    """FVU of the SAE on the bank's prompts (originals and paraphrases, last position)."""
    import torch

    acts = torch.cat([pairs.orig[hook], pairs.para[hook]]).float()
    with torch.no_grad():
        recon = sae.decode(sae.encode(acts))
    return float(((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum())


def base_text_analysis(
    card: dict[str, Any], sae: Any, work: Path, *, n_films: int, top_k: int, seed: int, progress: bool
) -> dict[str, Any]:
    """Evaluate, curate, discover, patch and replicate on the base model with reports as
    evidence; writes its stores under `work` and returns the summary block."""
    from flipscope.data.curation import curate
    from flipscope.data.flipbank import load_flipbank, save_flipbank
    from flipscope.data.questions import load_questions
    from flipscope.data.store import iter_rows, read_header
    from flipscope.experiments.discovery import discover
    from flipscope.experiments.evaluation import EvalConfig, run_sweep
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.patching import patch_bank
    from flipscope.experiments.replication import choose_features, replicate
    from flipscope.experiments.summary import summarize
    from flipscope.model.hooked import HookedVLM
    from flipscope.organism.bank import DEFAULT_RULES
    from flipscope.organism.config import OrganismConfig
    from flipscope.organism.questions import export_questions
    from flipscope.organism.real import base_folder

    cfg = OrganismConfig.from_dict(card["config"])
    vlm = HookedVLM.from_pretrained(base_folder(cfg.base))
    questions = load_questions(export_questions(cfg, work / "data", n_films=n_films, report=True))
    store = run_sweep(
        vlm, questions, EvalConfig(conditions=("context", "none")), work / "evaluation" / "results.jsonl",
        progress=progress,
    )  # fmt: skip
    bank = curate(iter_rows(store.path), questions, DEFAULT_RULES, source=read_header(store.path))
    bank = load_flipbank(save_flipbank(bank, work / "flipbank.json"))
    flips = bank["flips"]
    out: dict[str, Any] = {
        "model": f"{cfg.base} (base, text only)",
        "evaluation": summarize(iter_rows(store.path), seed=seed),
        "flipbank": {"n_flips": bank["n_flips"], "n_controls": bank["n_controls"]}
        | {"by_direction": {d: sum(c["direction"] == d for c in flips) for d in ("yes→no", "no→yes")}},
        "discovery": None,
        "patch": None,
        "replication": None,
    }
    if len({c["question_id"] for c in flips}) >= 2 and bank["n_controls"]:
        hook = card["hook_name"]
        pairs = collect_pairs(vlm, bank, [hook], progress=progress)
        found = discover(vlm, sae, bank, layers=[cfg.sae_layer], exact_top=0, pairs=pairs, seed=seed, progress=progress)
        features, chosen_by = choose_features(found, top_k)
        out["sae_fvu"] = _sae_fit(sae, pairs, hook)
        out["discovery"] = {
            "features": features,
            "chosen_by": chosen_by,
            "verdict": found.verdict,
            "found": found.found,
        }
        out["patch"] = patch_bank(vlm, sae, bank, features, pairs=pairs, progress=progress).summary
        out["replication"] = replicate(vlm, sae, bank, top_k=top_k, seed=seed, progress=progress)
    write_json(work / "summary.json", out)
    return out
