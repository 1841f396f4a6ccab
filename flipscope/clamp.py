"""Inference-time interventions: a `HookedVLM` with a fixed edit at one hook on every forward.

**Clamping** (`ClampedVLM`): at the SAE's hook, at every position of every forward (prefill and
each decoding step), x ← x − (f(x) − value) · W_dec[f] for each clamped feature f: the feature's
own contribution is replaced by `value` (0 switches it off) and everything else, the SAE error term
included, stays. **Direction ablation** (`DirectionAblatedVLM`): x ← x − (x · û) û at every position,
the SAE-free baseline a feature has to beat (e.g. û the DiffMean direction of flips vs controls).

Both expose the calls the rest of flipscope makes — `score`, `last_logits`, `generate`,
`run_with_cache`, `run_with_hooks`, `prompts`, `processor`, `identity` — so evaluation, discovery
and the CLI take them in place of the model. Their `hf_model` runs the HF model with the edit on,
so the shared-prefix evaluation path stays exact (an edit at every position is position-local).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from flipscope.errors import FlipscopeError
from flipscope.patching import check_features, shift_features_hook
from flipscope.sae import check_sae
from flipscope.stats import bootstrap

__all__ = [
    "ClampedVLM",
    "DirectionAblatedVLM",
    "InterventionVLM",
    "ablate_direction_hook",
    "clamp",
    "clamp_hook",
    "compare_clamped",
    "compare_interventions",
    "paired_difference",
]


def clamp_hook(sae: Any, values: Mapping[int, float]):
    """A hook holding each feature in `values` at its value, at every position."""
    return shift_features_hook(sae, [int(f) for f in values], torch.tensor([float(v) for v in values.values()]))


def ablate_direction_hook(direction: Float[Tensor, " d_model"]):
    """A hook projecting `direction` out of the residual at every position: x ← x − (x · û) û."""
    unit = direction.detach().float() / direction.detach().float().norm()

    def hook(x: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        u = unit.to(x.device)
        return x - ((x.float() @ u)[..., None] * u).to(x.dtype)

    return hook


class _InterventionHF:
    """The HF model, called with the intervention on (for code that calls `model.hf_model(...)`)."""

    def __init__(self, owner: InterventionVLM) -> None:
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.active():
            return self._owner.model.hf_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.model.hf_model, name)


class InterventionVLM:
    """`model` with `hook_fn` on at `hook_name` in every forward; `description` goes into
    `identity()`, so a store written with one intervention never resumes under another.

    Raises:
        FlipscopeError: `hook_name` is not one of the model's hook points.
    """

    def __init__(self, model: Any, hook_name: str, hook_fn: Callable, description: Mapping[str, Any]) -> None:
        if hook_name not in model.hook_dict:
            raise FlipscopeError(f"hook {hook_name!r} is not a hook point of the model (see `flipscope hooks`)")
        self.model = model
        self.hook_name = hook_name
        self.hook_fn = hook_fn
        self.description = dict(description)
        self.hf_model = _InterventionHF(self)

    # the model's facts, unchanged
    @property
    def prompts(self) -> Any:
        return self.model.prompts

    @property
    def processor(self) -> Any:
        return self.model.processor

    @property
    def answer_tokens(self) -> Any:
        return self.model.answer_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @property
    def d_model(self) -> int:
        return self.model.d_model

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return self.model.hook_dict

    def identity(self) -> dict[str, Any]:
        """The model's identity plus the intervention."""
        return {**self.model.identity(), **self.description}

    @contextmanager
    def active(self, fwd_hooks: Sequence = ()) -> Iterator[InterventionVLM]:
        """The intervention (and any extra hooks) on for the block; all removed on exit, even on error."""
        with self.model.hooks(fwd_hooks=[(self.hook_name, self.hook_fn), *fwd_hooks]):
            yield self

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = ()) -> Any:
        """Extra hooks for a block, with the intervention on (same shape as `HookedVLM.hooks`)."""
        if bwd_hooks:
            return self.model.hooks(fwd_hooks=[(self.hook_name, self.hook_fn), *fwd_hooks], bwd_hooks=bwd_hooks)
        return self.active(fwd_hooks)

    def __call__(self, inputs: Any, **kwargs: Any) -> Tensor:
        with self.active():
            return self.model(inputs, **kwargs)

    def score(self, inputs: Any) -> Float[Tensor, " batch"]:
        with self.active():
            return self.model.score(inputs)

    def last_logits(self, inputs: Any) -> Float[Tensor, "batch d_vocab"]:
        with self.active():
            return self.model.last_logits(inputs)

    def generate(self, inputs: Any, *, max_new_tokens: int = 16) -> list[str]:
        with self.active():
            return self.model.generate(inputs, max_new_tokens=max_new_tokens)

    def run_with_cache(self, inputs: Any, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        with self.active():
            return self.model.run_with_cache(inputs, **kwargs)

    def run_with_hooks(self, inputs: Any, *, fwd_hooks: Sequence = (), **kwargs: Any) -> Tensor:
        with self.active():
            return self.model.run_with_hooks(inputs, fwd_hooks=fwd_hooks, **kwargs)


class ClampedVLM(InterventionVLM):
    """`model` with SAE features clamped: `ClampedVLM(vlm, sae, {3818: 0.0})`.

    Raises:
        FlipscopeError: a feature is outside the SAE, or the SAE does not fit the model.
    """

    def __init__(self, model: Any, sae: Any, values: Mapping[int, float]) -> None:
        check_features(sae, list(values))
        hook_name = check_sae(sae, model)
        self.sae = sae
        self.values = {int(f): float(v) for f, v in values.items()}
        description = {"clamp": {"hook": hook_name, "values": self.values}}
        super().__init__(model, hook_name, clamp_hook(sae, self.values), description)


class DirectionAblatedVLM(InterventionVLM):
    """`model` with `direction` projected out of the residual at `hook_name`, every position.

    Raises:
        FlipscopeError: the direction is not a finite, nonzero vector of the model's width.
    """

    def __init__(
        self, model: Any, hook_name: str, direction: Float[Tensor, " d_model"], name: str = "direction"
    ) -> None:
        direction = torch.as_tensor(direction).detach().float().cpu()
        if direction.shape != (model.d_model,):
            raise FlipscopeError(
                f"direction has shape {tuple(direction.shape)}; expected ({model.d_model},), the model's d_model"
            )
        if not torch.isfinite(direction).all() or float(direction.norm()) == 0.0:
            raise FlipscopeError("direction must be finite and nonzero")
        self.direction = direction
        digest = hashlib.sha256(direction.numpy().tobytes()).hexdigest()[:16]
        description = {"ablate_direction": {"hook": hook_name, "name": name, "sha256": digest}}
        super().__init__(model, hook_name, ablate_direction_hook(direction), description)


@contextmanager
def clamp(model: Any, sae: Any, values: Mapping[int, float]) -> Iterator[ClampedVLM]:
    """`with clamp(vlm, sae, {f: 0.0}) as clamped:` — the same model, clamped, for a block."""
    yield ClampedVLM(model, sae, values)


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
    vlm: Any,
    questions: Sequence[Any],
    interventions: Mapping[str, InterventionVLM],
    out: str | Path,
    cfg: Any = None,
    *,
    baseline_store: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `vlm` as it is and under each named intervention on the same questions (stores
    under `out/baseline`, `out/<name>`, each resumable) and compare: every summary, and per
    intervention the paired change in flip rate, accuracy and text-only agreement against the
    baseline (bootstrap CI and McNemar's test over questions). `baseline_store` reuses an
    evaluation of the same questions and config already on disk (resumed, not recomputed).

    Returns:
        `{"baseline": summary, "interventions": [{"name", "description", "summary", "paired"}]}`.
    """
    from flipscope.evaluate import question_table, summarize
    from flipscope.store import read_rows
    from flipscope.sweep import EvalConfig, run_sweep

    for name in interventions:
        if name == "baseline" or not name or "/" in name:
            raise FlipscopeError(f"intervention name {name!r}: use a nonempty folder name other than 'baseline'")
    cfg = cfg or EvalConfig(conditions=("image", "blank"))
    out = Path(out)
    base_path = Path(baseline_store) if baseline_store is not None else out / "baseline" / "results.jsonl"
    base_rows = read_rows(run_sweep(vlm, questions, cfg, base_path, progress=progress).path)
    base = question_table(base_rows)
    ids = sorted(base)
    report: dict[str, Any] = {"baseline": summarize(base_rows), "interventions": []}
    for name, model in interventions.items():
        rows = read_rows(run_sweep(model, questions, cfg, out / name / "results.jsonl", progress=progress).path)
        table = question_table(rows)
        paired = {
            measure: paired_difference([base[q][key] for q in ids], [table[q][key] for q in ids])
            for measure, key in (
                ("flip_rate", "flip"),
                ("accuracy", "correct"),
                ("text_only_agreement", "text_only_agreement"),
            )
            if base[ids[0]][key] is not None
        }
        report["interventions"].append(
            {"name": name, "description": model.description, "summary": summarize(rows), "paired": paired}
        )
    return report


def compare_clamped(
    vlm: Any,
    sae: Any,
    questions: Sequence[Any],
    clamps: Sequence[Mapping[int, float]],
    out: str | Path,
    cfg: Any = None,
    *,
    also: Mapping[str, InterventionVLM] | None = None,
    baseline_store: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`compare_interventions` over one `ClampedVLM` per mapping in `clamps` (named `clamp-<k>`),
    plus any interventions in `also` (e.g. a DiffMean-direction ablation) reported beside them."""
    models: dict[str, InterventionVLM] = {f"clamp-{k}": ClampedVLM(vlm, sae, v) for k, v in enumerate(clamps)}
    models.update(also or {})
    return compare_interventions(vlm, questions, models, out, cfg, baseline_store=baseline_store, progress=progress)
