"""A guarded model: each answer with flags that say whether to trust it.

`GuardedVLM(model, GuardConfig(...))` is a sibling of `model` (a `HookedVLM`, or a clamped or
ablated one: its edits stay) that answers exactly as `model` does and adds, per answer:

- `flip_prone` (no extra pass): |margin| at or below the calibrated threshold, or the hidden-state
  probe's p(flip-prone) at or above its threshold;
- `image_unreliant` (one extra pass): with `image_check="opposite"`, the answer survives a reference
  film of the same finding labelled with the *other* answer (at run time the truth is unknown, so
  the film is chosen opposite to the model's own answer); with `"blank"`, removing the film moves
  the answer toward the other one by no more than the calibrated delta. Where no reference film of
  that finding and label exists, the flag is None and its reason says so (no other film stands in);
- `abstain`: either flag set.

Thresholds come from `flipscope guard calibrate` (`GuardConfig.from_study`).

`answer(..., fast=True)` reads the same margins and probe states on the suffix path
(`flipscope.model.suffix`): each batch's part before the questions (chat header and film, ~265 of
MedGemma's ~280 tokens) runs once per film and every wording's question and tail on its key/value
cache, equal to the whole prompts' to float rounding (tested to 1e-4); without it every prompt runs
whole, bit for bit the model's own forward. `flipscope guard answer` runs that way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipscope.errors import FlipscopeError
from flipscope.model.answers import yes_no_margin
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.model.suffix import question_runs

__all__ = ["IMAGE_CHECKS", "GuardConfig", "GuardedAnswer", "GuardedVLM", "apply_probe", "reference_films"]

IMAGE_CHECKS = ("off", "opposite", "blank")


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """The guard's gates.

    Attributes:
        abs_margin: Flip-prone when |margin| ≤ this (None: this gate is off).
        probe: A probe from `flipscope.experiments.detectors.fit_probe` (w, b, mean, std) with its
            `hook`, read at the answer position; None: off.
        probe_threshold: Flip-prone when the probe's p ≥ this.
        image_check: `off`, `opposite` (a reference film with the other label) or `blank`.
        blank_delta: With `blank`: image-unreliant when the blank moves the answer toward the other
            answer by ≤ this.
    """

    abs_margin: float | None = None
    probe: Mapping[str, Any] | None = None
    probe_threshold: float | None = None
    image_check: str = "off"
    blank_delta: float | None = None

    def __post_init__(self) -> None:
        if self.image_check not in IMAGE_CHECKS:
            raise FlipscopeError(f"image_check {self.image_check!r} is unknown; expected one of {IMAGE_CHECKS}")
        if self.image_check == "blank" and self.blank_delta is None:
            raise FlipscopeError("image_check 'blank' needs blank_delta (from `flipscope guard calibrate`)")
        if (self.probe is None) != (self.probe_threshold is None):
            raise FlipscopeError("a probe needs its probe_threshold, and a threshold its probe")

    @classmethod
    def from_study(cls, study: Mapping[str, Any], *, image_check: str = "opposite", probe: bool = True) -> GuardConfig:
        """The gates a `guard_study` calibrated (the probe's only when it fitted one for flips)."""
        gates = study["thresholds"]
        fitted = study.get("probes", {}).get("flip_prone")
        use_probe = probe and fitted is not None and gates.get("probe") is not None
        return cls(
            abs_margin=gates.get("margin"),
            probe={**fitted, "hook": study["probe_hook"]} if use_probe else None,
            probe_threshold=gates["probe"] if use_probe else None,
            image_check=image_check,
            blank_delta=gates.get("blank"),
        )


@dataclass(frozen=True)
class GuardedAnswer:
    """One guarded answer: the model's own answer and margin, the flags and the decision."""

    answer: str
    margin: float
    flip_prone: bool
    image_unreliant: bool | None
    abstain: bool
    reasons: tuple[str, ...] = field(default=())


def reference_films(questions: Sequence[Any]) -> dict[str, dict[str, list[Path]]]:
    """Reference films by finding and label (`{"effusion": {"yes": [...], "no": [...]}}`) from
    labelled questions, e.g. the calibration questions."""
    films: dict[str, dict[str, list[Path]]] = {}
    for q in questions:
        pool = films.setdefault(q.finding, {"yes": [], "no": []})["yes" if q.answer else "no"]
        if q.image is not None and q.image not in pool:
            pool.append(q.image)
    return films


class GuardedVLM(HookedVLM):
    """`model` answering with flags (module docstring); every other method is `model`'s own."""

    def __init__(
        self,
        model: HookedVLM,
        config: GuardConfig,
        references: Mapping[str, Mapping[str, Sequence[str | Path]]] | None = None,
    ) -> None:
        if config.image_check == "opposite" and references is None:
            raise FlipscopeError("image_check 'opposite' needs reference films by finding and label")
        if config.probe is not None:
            model.check_hook_name(config.probe["hook"])
        super().__init__(**model.sibling_args())
        self.config = config
        self.references = {f: {k: [Path(p) for p in v] for k, v in by.items()} for f, by in (references or {}).items()}

    def _margins(
        self, specs: Sequence[PromptSpec], batch_size: int, fast: bool = False, probe: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Margins (as `score` gives them, or on the suffix path with `fast`) and, with a probe and
        `probe`, its p per prompt: one pass."""
        margins, probs = [], []
        hook = None if self.config.probe is None or not probe else self.config.probe["hook"]
        with torch.no_grad():
            for start in range(0, len(specs), batch_size):
                chunk = specs[start : start + batch_size]
                if fast:
                    runs = question_runs(self, chunk, [hook] if hook else [])
                    margin, cache = runs.run_with_cache([hook], last=True) if hook else (runs.margins(), None)
                elif hook is None:
                    margin, cache = self.score(self.prompts.build(chunk)), None
                else:
                    logits, cache = self.run_with_cache(
                        self.prompts.build(chunk), names_filter=[hook], positions="last", logits_to_keep=1
                    )
                    margin = yes_no_margin(logits[:, -1], self.answer_tokens)
                margins.append(margin.float().cpu())
                if hook:
                    states = cache[hook].reshape(len(chunk), -1).double().cpu().numpy()
                    probs.append(apply_probe(self.config.probe, states))
        return torch.cat(margins).numpy(), (np.concatenate(probs) if probs else None)

    def answer(
        self,
        specs: Sequence[PromptSpec],
        findings: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        fast: bool = False,
    ) -> list[GuardedAnswer]:
        """Guarded answers to `specs` (each with its film), `findings[i]` naming what prompt i asks
        about (needed by the `opposite` image check); `fast`: on the suffix path (module docstring)."""
        if self.config.image_check == "opposite" and (findings is None or len(findings) != len(specs)):
            raise FlipscopeError("the opposite-film check needs one finding per prompt")
        margins, probs = self._margins(specs, batch_size, fast)
        cfg = self.config
        flip = np.zeros(len(specs), dtype=bool)
        if cfg.abs_margin is not None:
            flip |= np.abs(margins) <= cfg.abs_margin
        if probs is not None:
            flip |= probs >= cfg.probe_threshold
        unreliant, reasons = self._image_check(specs, findings, margins, batch_size, fast)
        out = []
        for i, m in enumerate(margins.tolist()):
            why = [*(("flip-prone",) if flip[i] else ()), *reasons[i]]
            out.append(GuardedAnswer("yes" if m > 0 else "no", m, bool(flip[i]), unreliant[i],
                                     bool(flip[i] or unreliant[i]), tuple(why)))  # fmt: skip
        return out

    def _image_check(
        self,
        specs: Sequence[PromptSpec],
        findings: Sequence[str] | None,
        margins: np.ndarray,
        batch_size: int,
        fast: bool,
    ) -> tuple[list[bool | None], list[list[str]]]:
        n = len(specs)
        if self.config.image_check == "off":
            return [None] * n, [[] for _ in range(n)]
        reasons: list[list[str]] = [[] for _ in range(n)]
        second: list[PromptSpec | None] = []
        for i, (spec, m) in enumerate(zip(specs, margins.tolist(), strict=True)):
            if self.config.image_check == "blank":
                second.append(replace(spec, condition="blank", image=None))
                continue
            other = "no" if m > 0 else "yes"
            pool = self.references.get(findings[i], {}).get(other, [])
            if not pool:
                reasons[i].append(f"no reference film of {findings[i]!r} labelled {other!r}: image reliance unknown")
            second.append(replace(spec, image=pool[0]) if pool else None)
        asked = [i for i, s in enumerate(second) if s is not None]
        moved = self._margins([second[i] for i in asked], batch_size, fast, probe=False)[0] if asked else np.zeros(0)
        unreliant: list[bool | None] = [None] * n
        for i, m2 in zip(asked, moved.tolist(), strict=True):
            m = float(margins[i])
            if self.config.image_check == "blank":
                unreliant[i] = bool(np.sign(m) * (m - m2) <= self.config.blank_delta)
            else:
                unreliant[i] = (m2 > 0) == (m > 0)
            if unreliant[i]:
                reasons[i].append("image-unreliant")
        return unreliant, reasons


def apply_probe(probe: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """p(target) of a logistic probe (`w`, `b`, standardisation `mean`, `std`) for each row of `x`."""
    z = ((x - np.asarray(probe["mean"])) / np.asarray(probe["std"])) @ np.asarray(probe["w"]) + float(probe["b"])
    return 1 / (1 + np.exp(-z))
