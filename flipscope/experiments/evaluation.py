"""Running a model over questions × prompts × image conditions into a resumable store.

Work is cut into units — a chunk of `questions_per_unit` questions under one condition — computed
in a fixed order and written whole, so an interrupted run resumes where it stopped and ends with
the same file as an uninterrupted one (the batches inside a unit never change).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flipscope.data.questions import Question
from flipscope.data.store import ResultStore
from flipscope.errors import FlipscopeError
from flipscope.experiments.launch import parse_shard
from flipscope.experiments.preflight import check_evidence, check_prompt_lengths, image_digests
from flipscope.model.answers import binary_entropy, p_yes, parse_answer, require_finite
from flipscope.model.images import BlankSpec, load_image
from flipscope.model.kv import Prefix
from flipscope.model.prompts import IMAGE_CONDITIONS, PromptBuilder, PromptSpec
from flipscope.model.protocol import ScoringModel

__all__ = [
    "SWAP_MATCHES",
    "EvalConfig",
    "check_evidence",
    "check_prompt_lengths",
    "image_digests",
    "opposite_images",
    "parse_shard",
    "questions_fingerprint",
    "run_sweep",
    "swap_images",
    "unit_key",
    "unit_order",
    "unit_prompts",
]

logger = logging.getLogger(__name__)
SWAP_MATCHES = ("any", "opposite")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How an evaluation runs.

    Attributes:
        conditions: Evidence conditions, the evidence shown first: `image` for a VLM, `context`
            (the question's text passage) for a text model (see `flipscope.model.prompts`).
        blank: The blank stand-in (`gray`, `white` or `noise`) and `blank_seed` for noise.
        swap_seed: Seed of the pairing that gives each question another question's image.
        swap_match: Which image a swap shows: `any` other question's (a random partner often shares
            the true answer), or `opposite`: a film of the same finding whose truth is the opposite
            (the clean test of reliance; a question with no such film has no swap rows).
        batch_size: Prompts per forward.
        questions_per_unit: Questions per unit of resumable work.
        generate_tokens: Also generate this many tokens greedily per prompt and parse the text
            with the keyword parser, as the paper computes flip rates (0: off).
        fast: Run prompts that share an image on one cached prefix (`flipscope.model.kv`): the
            vision tower and the template's pre-question tokens once per image, and once per run
            for the blank and no-image conditions. Off: plain left-padded batches of full prompts.
    """

    conditions: tuple[str, ...] = ("image", "blank")
    blank: str = "gray"
    blank_seed: int = 0
    swap_seed: int = 0
    swap_match: str = "any"
    batch_size: int = 32
    questions_per_unit: int = 16
    generate_tokens: int = 0
    fast: bool = True

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in IMAGE_CONDITIONS]
        if unknown:
            raise FlipscopeError(f"conditions {unknown} are unknown; expected some of {', '.join(IMAGE_CONDITIONS)}")
        if not self.conditions or self.conditions[0] not in ("image", "context"):
            raise FlipscopeError(
                f"conditions {list(self.conditions)} must start with the evidence: 'image' (or 'context' for a "
                "text model)"
            )
        if len(set(self.conditions)) != len(self.conditions):
            raise FlipscopeError(f"conditions {list(self.conditions)} repeat")
        BlankSpec(kind=self.blank, seed=self.blank_seed)
        if self.swap_match not in SWAP_MATCHES:
            raise FlipscopeError(f"swap_match {self.swap_match!r} is unknown; expected one of {SWAP_MATCHES}")
        if self.batch_size < 1 or self.questions_per_unit < 1:
            raise FlipscopeError("batch_size and questions_per_unit must be positive")
        if self.generate_tokens < 0:
            raise FlipscopeError(f"generate_tokens {self.generate_tokens} is negative; expected 0 (off) or more")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        data = dict(data)
        data["conditions"] = tuple(data.get("conditions", ("image", "blank")))
        return cls(**data)


def swap_images(questions: Sequence[Question], seed: int, *, text: bool = False, match: str = "any") -> dict[str, Any]:
    """Each question's swap image: another question's image (a different file), by a seeded
    derangement over the questions; with `match="opposite"`, see `opposite_images`."""
    if match == "opposite":
        return opposite_images(questions, seed)
    order = np.random.default_rng(seed).permutation(len(questions))
    partner: dict[str, Any] = {}
    for rank, index in enumerate(order):
        question = questions[index]
        for step in range(1, len(order)):
            other = questions[order[(rank + step) % len(order)]]
            if _evidence(other, text) != _evidence(question, text):
                partner[question.id] = _evidence(other, text)
                break
        else:
            what = "context passages" if text else "images"
            raise FlipscopeError(f"condition 'swap' needs questions with at least two different {what}")
    return partner


def opposite_images(questions: Sequence[Question], seed: int) -> dict[str, Path | None]:
    """Each question's opposite-label image: a seeded draw among the films of the other questions
    about the same finding whose truth is the opposite (None where there is none: such a question
    gets no swap, and says so, rather than a film that may carry its own answer)."""
    rng = np.random.default_rng(seed)
    pools: dict[tuple[str, bool], list[Path]] = {}
    for q in questions:
        pool = pools.setdefault((q.finding, q.answer), [])
        if q.image is not None and q.image not in pool:
            pool.append(q.image)
    partner: dict[str, Path | None] = {}
    for q in questions:
        pool = [image for image in pools.get((q.finding, not q.answer), []) if image != q.image]
        partner[q.id] = pool[int(rng.integers(len(pool)))] if pool else None
    return partner


def _evidence(question: Question, text: bool) -> Any:
    return question.context if text else question.image


def questions_fingerprint(questions: Sequence[Question], images: dict[Path, str] | None = None) -> str:
    """Hash of the questions and their images' pixels (not paths: the data folder may move), as
    an evaluation's store header records it (`images`: `image_digests(questions)`, computed if
    not given). Curation compares it with the store's to refuse questions edited since."""
    images = image_digests(questions) if images is None else images
    digest = hashlib.sha256()
    for q in questions:
        shown = images.get(q.image) if q.image is not None else None
        fields = [q.id, shown, q.finding, q.answer, q.prompts, q.strategies]
        fields += [] if q.context is None else [q.context]
        fields += [] if q.relations is None else [{"relations": q.relations}]
        digest.update(json.dumps(fields).encode())
    return digest.hexdigest()


def _identity(cfg: EvalConfig) -> dict[str, Any]:
    """The config fields that change results (not `batch_size`: a rerun after an out-of-memory
    error may lower it; a unit's margins then differ only in float rounding, ~1e-6; `swap_match`
    only when not the default, so stores written before it resume)."""
    return {k: v for k, v in cfg.to_dict().items() if k != "batch_size" and (k, v) != ("swap_match", "any")}


def _builder(model: Any, blank: BlankSpec) -> Any:
    """The model's own prompt builder (family-aware, or a model adapter's) showing `blank`, or one
    over its processor."""
    prompts = getattr(model, "prompts", None)
    prompts = prompts if hasattr(prompts, "with_blank") else PromptBuilder(model.processor)
    return prompts.with_blank(blank)


def _model_identity(model: Any) -> dict[str, Any]:
    identity = getattr(model, "identity", None)
    if callable(identity):
        return identity()
    return {"name_or_path": getattr(model, "name_or_path", type(model).__name__)}


def _by_image(questions: Sequence[Question], swaps: dict[str, Any] | None, text: bool = False) -> dict[Any, list[int]]:
    """Prompt indices (in unit order) grouped by the evidence (image, or context passage) their
    question shows."""
    groups: dict[Any, list[int]] = {}
    start = 0
    for q in questions:
        if swaps is not None and swaps[q.id] is None:  # no opposite-label film: no prompts in this unit
            continue
        image = swaps[q.id] if swaps is not None else _evidence(q, text)
        groups.setdefault(image, []).extend(range(start, start + len(q.prompts)))
        start += len(q.prompts)
    return groups


def unit_order(conditions: Sequence[str], n_questions: int, questions_per_unit: int) -> list[tuple[str, int]]:
    """Every unit of a run as (condition, question chunk), in the order a single process computes them."""
    n_chunks = -(-n_questions // questions_per_unit)
    return [(condition, index) for index in range(n_chunks) for condition in conditions]


def unit_key(condition: str, index: int) -> str:
    return f"{condition}/{index}"


def unit_prompts(
    chunk: Sequence[Question], condition: str, swaps: dict[str, Any]
) -> tuple[list[PromptSpec], list[dict[str, Any]]]:
    """The prompts of one unit and their rows' identifying fields (each film read once per unit,
    however many questions show it)."""
    rows: list[dict[str, Any]] = []
    specs: list[PromptSpec] = []
    films: dict[Path, Any] = {}
    for q in chunk:
        evidence: dict[str, Any] = {}
        if condition == "swap" and swaps[q.id] is None:  # no opposite-label film for it
            continue
        if condition == "context":
            evidence = {"context": q.context}
        elif condition == "swap" and q.context is not None and isinstance(swaps[q.id], str):
            evidence = {"swap_context": swaps[q.id]}
        elif condition in ("image", "swap"):
            shown = q.image if condition == "image" else swaps[q.id]
            if shown not in films:
                films[shown] = load_image(shown)
            evidence = {"image" if condition == "image" else "swap_image": films[shown]}
        for k, text in enumerate(q.prompts):
            specs.append(PromptSpec(question=text, condition=condition, **evidence))
            rows.append(
                {
                    "question_id": q.id,
                    "finding": q.finding,
                    "truth": "yes" if q.truth(k) else "no",
                    "prompt_index": k,
                    "kind": "original" if k == 0 else "paraphrase",
                    "strategy": q.strategies[k - 1] if (k and q.strategies) else None,
                    "condition": condition,
                }
                | ({"relation": "inverted" if q.inverted(k) else "same"} if q.relations is not None and k else {})
            )
    return specs, rows


class _UnitScorer:
    """Margins of one unit's prompts on the shared-prefix path (the blank and no-image prefixes
    computed once per run, an image's once per unit) or as plain batches."""

    def __init__(self, model: ScoringModel, builder: Any, cfg: EvalConfig, fast: bool) -> None:
        self.model, self.builder, self.cfg, self.fast = model, builder, cfg, fast
        self.shared: dict[str, Prefix] = {}

    def margins(
        self, specs: list[PromptSpec], chunk: Sequence[Question], condition: str, swaps: dict[str, Any]
    ) -> Tensor:
        model, builder, size = self.model, self.builder, self.cfg.batch_size
        if not specs:  # a swap unit whose questions have no opposite-label film
            return torch.empty(0)
        if not self.fast:
            return torch.cat([model.score(builder.build(specs[i : i + size])) for i in range(0, len(specs), size)])
        if condition in ("blank", "none"):  # one image slot for every question: once per run
            if condition not in self.shared:
                self.shared[condition] = model.run_prefix(specs[0], builder=builder)
            return model.score_shared_prefix(specs, builder=builder, batch_size=size, prefix=self.shared[condition])
        margins = torch.empty(len(specs))
        text = condition == "context" or (condition == "swap" and isinstance(next(iter(swaps.values())), str))
        for members in _by_image(chunk, swaps if condition == "swap" else None, text).values():
            group = [specs[i] for i in members]
            margins[members] = model.score_shared_prefix(group, builder=builder, batch_size=size)
        return margins

    def generated(self, specs: list[PromptSpec]) -> list[str]:
        size = self.cfg.batch_size
        return [
            text
            for i in range(0, len(specs), size)
            for text in self.model.generate(
                self.builder.build(specs[i : i + size]), max_new_tokens=self.cfg.generate_tokens
            )
        ]


def _fill_rows(rows: list[dict[str, Any]], margins: Tensor, texts: list[str] | None) -> None:
    """Add each row's generated text (if any), margin, p(yes), entropy and answer (refusing a
    non-finite margin, which is no answer)."""
    require_finite(
        margins,
        lambda i: (
            f"question {rows[i]['question_id']!r}, prompt {rows[i]['prompt_index']}, condition {rows[i]['condition']!r}"
        ),
    )
    for row, text in zip(rows, texts or [None] * len(rows), strict=True):
        if text is not None:
            parsed = parse_answer(text)
            row.update(generated=text, parsed=parsed.answer, parse_reason=parsed.reason)
    for row, margin, prob, entropy in zip(
        rows, margins.tolist(), p_yes(margins).tolist(), binary_entropy(margins).tolist(), strict=True
    ):
        row.update(margin=margin, p_yes=prob, entropy=entropy, answer="yes" if margin > 0 else "no")


def run_sweep(
    model: ScoringModel,
    questions: Sequence[Question],
    cfg: EvalConfig,
    store_path: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> ResultStore:
    """Score every question's prompts under every condition into the store at `store_path`.

    `model` is a `VLM` (`HookedVLM`, a clamped model) or a model adapter; without the KV-cache
    methods, or where its family makes them unsound (the header's `path_reason`), it runs the
    batched path. Rows: question_id, finding, truth (the prompt's own: the original's opposite on
    an answer-inverting paraphrase), prompt_index (0 = original), kind, strategy, condition,
    margin, p_yes, entropy, answer, and `relation` where the questions carry relations; with
    `generate_tokens`, also generated, parsed (yes/no or None when excluded) and parse_reason.
    With `shard=(K, N)` only question chunks whose index is K modulo N are run (one shard per GPU
    or array task); `merge_shards` joins the N stores into the store a single process writes.
    """
    off = (
        getattr(model, "fast_path_off", None)
        if hasattr(model, "score_shared_prefix")
        else "the model has no KV-cache path"
    )
    fast = cfg.fast and off is None
    builder = _builder(model, BlankSpec(kind=cfg.blank, seed=cfg.blank_seed))
    check_evidence(questions, cfg.conditions, model)
    text = cfg.conditions[0] == "context"
    check_prompt_lengths(questions, builder, getattr(model, "context_length", None), with_image=not text)
    images = image_digests(questions)
    header = {
        "kind": "flip-evaluation",
        "eval_config": _identity(cfg),
        "model": _model_identity(model),
        "dtype": str(getattr(model, "dtype", None)),
        "questions": {"n": len(questions), "sha256": questions_fingerprint(questions, images)},
        "shard": list(shard) if shard is not None else None,
        "path": "shared-prefix" if fast else "batched",
    }
    if cfg.fast and not fast:
        header["path_reason"] = off
    logger.info("evaluation path: %s", header["path"])
    store = ResultStore.open(store_path, header)
    scorer = _UnitScorer(model, builder, cfg, fast)
    swaps = swap_images(questions, cfg.swap_seed, text=text, match=cfg.swap_match) if "swap" in cfg.conditions else {}
    chunks = [questions[i : i + cfg.questions_per_unit] for i in range(0, len(questions), cfg.questions_per_unit)]
    units = unit_order(cfg.conditions, len(questions), cfg.questions_per_unit)
    if shard is not None:
        units = [(c, i) for c, i in units if i % shard[1] == shard[0]]
    todo = [(c, i) for c, i in units if unit_key(c, i) not in store.done]
    if len(todo) < len(units):
        logger.info("resuming %s: %d of %d units already done", store_path, len(units) - len(todo), len(units))
    with store, torch.no_grad():
        for condition, index in tqdm(todo, desc="evaluating", disable=not progress or not todo):
            specs, rows = unit_prompts(chunks[index], condition, swaps)
            margins = scorer.margins(specs, chunks[index], condition, swaps)
            _fill_rows(rows, margins, scorer.generated(specs) if cfg.generate_tokens else None)
            store.append(unit_key(condition, index), rows)
    return store
