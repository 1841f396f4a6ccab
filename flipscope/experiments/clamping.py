"""Evaluating edited models against the model as it is: flip rate, accuracy and text-only
agreement under each intervention, with the paired change over questions (bootstrap CI and
McNemar's exact test)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from flipscope.data.questions import Question
from flipscope.data.store import iter_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.experiments.launch import Launch
from flipscope.experiments.sharded import run_sharded
from flipscope.experiments.summary import question_table, summarize
from flipscope.interventions.edited import ClampedVLM, EditedVLM
from flipscope.model.hooked import HookedVLM
from flipscope.model.vision_once import distinct_images_of
from flipscope.stats import bootstrap

__all__ = ["compare_clamped", "compare_interventions", "paired_difference"]

PAIRED_MEASURES = (("flip_rate", "flip"), ("accuracy", "correct"), ("text_only_agreement", "text_only_agreement"))


def paired_difference(before: Sequence[bool], after: Sequence[bool], seed: int = 0) -> dict[str, Any]:
    """Paired comparison of a per-question yes/no measure (e.g. flipped) before and after: the
    change in its rate with a bootstrap 95% CI over questions, and McNemar's exact test on the
    discordant questions."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    up, down = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    p = float(stats.binomtest(up, up + down, 0.5).pvalue) if up + down else 1.0
    return {
        "before": float(a.mean()),
        "after": float(b.mean()),
        "change": bootstrap(b - a, seed=seed).to_dict(),
        "relative_change": float((b.mean() - a.mean()) / a.mean()) if a.mean() else None,
        "became_1": up,
        "became_0": down,
        "mcnemar_p": p,
    }


def compare_interventions(
    vlm: HookedVLM,
    questions: Sequence[Question],
    interventions: Mapping[str, EditedVLM],
    out: str | Path,
    cfg: EvalConfig | None = None,
    *,
    baseline_store: str | Path | None = None,
    progress: bool = True,
    launch: Launch | None = None,
) -> dict[str, Any] | None:
    """Evaluate `vlm` as it is and under each named intervention on the same questions (stores
    under `out/baseline`, `out/<name>`, each resumable) and compare: every summary, and per
    intervention the paired change in flip rate, accuracy and text-only agreement against the
    baseline (bootstrap CI and McNemar's test over questions). `baseline_store` reuses an
    evaluation of the same questions and config already on disk (resumed, not recomputed).

    The interventions are `vlm`'s edited siblings and share its image memo: each film goes through
    the vision tower once for all of them (`HookedVLM.distinct_images`; an edit on the tower
    itself bypasses the memo): on the shared-prefix path, where each film runs alone anyway, the
    same bits as a tower run per evaluation; on the batched path, equal to float rounding.

    Under a `launch`, each store is computed in shards (`run_sharded`); only the process that
    holds every merged store (rank 0, or one process) gets the report, the others None.

    Returns:
        `{"baseline": summary, "interventions": [{"name", "description", "summary", "paired"}]}`.
    """
    for name in interventions:
        if name == "baseline" or not name or "/" in name:
            raise FlipscopeError(f"intervention name {name!r}: use a nonempty folder name other than 'baseline'")
    cfg = cfg or EvalConfig(conditions=("image", "blank"))
    out = Path(out)

    def sweep(model: Any, path: Path) -> Path | None:
        def run(part: tuple[int, int] | None, where: Path) -> Any:
            return run_sweep(model, questions, cfg, where, shard=part, progress=progress)

        with distinct_images_of(model):
            return run_sharded(run, path, launch, manual_in_place=False)

    base_path = Path(baseline_store) if baseline_store is not None else out / "baseline" / "results.jsonl"
    paths = {"baseline": sweep(vlm, base_path)}
    paths.update({name: sweep(model, out / name / "results.jsonl") for name, model in interventions.items()})
    if launch is not None and (None in paths.values() or not launch.is_main):
        return None
    base_path = paths["baseline"]
    base = question_table(iter_rows(base_path))
    ids = sorted(base)
    report: dict[str, Any] = {"baseline": summarize(iter_rows(base_path)), "interventions": []}
    for name, model in interventions.items():
        path = paths[name]
        table = question_table(iter_rows(path))
        paired = {
            measure: paired_difference([base[q][key] for q in ids], [table[q][key] for q in ids])
            for measure, key in PAIRED_MEASURES
            if base[ids[0]][key] is not None
        }
        report["interventions"].append(
            {"name": name, "description": model.description, "summary": summarize(iter_rows(path)), "paired": paired}
        )
    return report


def compare_clamped(
    vlm: HookedVLM,
    sae: Any,
    questions: Sequence[Question],
    clamps: Sequence[Mapping[int, float]],
    out: str | Path,
    cfg: EvalConfig | None = None,
    *,
    also: Mapping[str, EditedVLM] | None = None,
    baseline_store: str | Path | None = None,
    progress: bool = True,
    launch: Launch | None = None,
) -> dict[str, Any] | None:
    """`compare_interventions` over one `ClampedVLM` per mapping in `clamps` (named `clamp-<k>`),
    plus any interventions in `also` (e.g. a DiffMean-direction ablation) reported beside them."""
    models: dict[str, EditedVLM] = {f"clamp-{k}": ClampedVLM(vlm, sae, v) for k, v in enumerate(clamps)}
    models.update(also or {})
    return compare_interventions(
        vlm, questions, models, out, cfg, baseline_store=baseline_store, progress=progress, launch=launch
    )
