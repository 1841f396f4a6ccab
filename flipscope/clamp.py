"""The clamped model: a `HookedVLM` whose SAE features are held at fixed values at inference.

At the SAE's hook, at every position of every forward (prefill and each decoding step),
x ← x − (f(x) − value) · W_dec[f] for each clamped feature f: the feature's own contribution is
replaced by `value` (0 switches it off) and everything else, the SAE error term included, stays.
`ClampedVLM` exposes the calls the rest of flipscope makes — `score`, `last_logits`, `generate`,
`run_with_cache`, `run_with_hooks`, `prompts`, `processor`, `identity` — so evaluation, discovery
and the CLI take it in place of the model. Its `hf_model` runs the HF model with the clamp on, so
the shared-prefix evaluation path stays exact (a clamp at every position is position-local).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from flipscope.patching import check_features, shift_features_hook
from flipscope.sae import check_sae
from flipscope.stats import bootstrap

__all__ = ["ClampedVLM", "clamp", "clamp_hook", "compare_clamped", "paired_difference"]


def clamp_hook(sae: Any, values: Mapping[int, float]):
    """A hook holding each feature in `values` at its value, at every position."""
    return shift_features_hook(sae, [int(f) for f in values], torch.tensor([float(v) for v in values.values()]))


class _ClampedHF:
    """The HF model, called with the clamp hook on (for code that calls `model.hf_model(...)`)."""

    def __init__(self, owner: ClampedVLM) -> None:
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._owner.active():
            return self._owner.model.hf_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.model.hf_model, name)


class ClampedVLM:
    """`model` with SAE features clamped: `ClampedVLM(vlm, sae, {3818: 0.0})`.

    Raises:
        FlipscopeError: a feature is outside the SAE, or the SAE does not fit the model.
    """

    def __init__(self, model: Any, sae: Any, values: Mapping[int, float]) -> None:
        check_features(sae, list(values))
        self.model = model
        self.sae = sae
        self.values = {int(f): float(v) for f, v in values.items()}
        self.hook_name = check_sae(sae, model)
        self.hf_model = _ClampedHF(self)

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
        """The model's identity plus the clamp (so a clamped run never resumes an unclamped store)."""
        return {**self.model.identity(), "clamp": {"hook": self.hook_name, "values": self.values}}

    @contextmanager
    def active(self, fwd_hooks: Sequence = ()) -> Iterator[ClampedVLM]:
        """The clamp (and any extra hooks) on for the block; all removed on exit, even on error."""
        with self.model.hooks(fwd_hooks=[(self.hook_name, clamp_hook(self.sae, self.values)), *fwd_hooks]):
            yield self

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = ()) -> Any:
        """Extra hooks for a block, with the clamp on (same shape as `HookedVLM.hooks`)."""
        if bwd_hooks:
            return self.model.hooks(
                fwd_hooks=[(self.hook_name, clamp_hook(self.sae, self.values)), *fwd_hooks], bwd_hooks=bwd_hooks
            )
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


def compare_clamped(
    vlm: Any,
    sae: Any,
    questions: Sequence[Any],
    clamps: Sequence[Mapping[int, float]],
    out: str | Path,
    cfg: Any = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `vlm` unclamped and with each clamp in `clamps` on the same questions (stores under
    `out/unclamped`, `out/clamp-<k>`, each resumable) and compare: every summary, and per clamp
    the paired change in flip rate, accuracy and text-only agreement against the unclamped run."""
    from flipscope.evaluate import question_table, summarize
    from flipscope.store import read_rows
    from flipscope.sweep import EvalConfig, run_sweep

    cfg = cfg or EvalConfig(conditions=("image", "blank"))
    out = Path(out)
    base_rows = read_rows(run_sweep(vlm, questions, cfg, out / "unclamped" / "results.jsonl", progress=progress).path)
    base = question_table(base_rows)
    report: dict[str, Any] = {"unclamped": summarize(base_rows), "clamped": []}
    for k, values in enumerate(clamps):
        model = ClampedVLM(vlm, sae, values)
        rows = read_rows(run_sweep(model, questions, cfg, out / f"clamp-{k}" / "results.jsonl", progress=progress).path)
        table = question_table(rows)
        ids = sorted(base)
        paired = {
            measure: paired_difference([base[q][key] for q in ids], [table[q][key] for q in ids])
            for measure, key in (
                ("flip_rate", "flip"),
                ("accuracy", "correct"),
                ("text_only_agreement", "text_only_agreement"),
            )
            if base[ids[0]][key] is not None
        }
        report["clamped"].append({"values": model.values, "summary": summarize(rows), "paired": paired})
    return report
