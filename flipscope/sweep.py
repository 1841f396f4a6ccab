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
from tqdm.auto import tqdm

from flipscope.answers import binary_entropy, p_yes, parse_answer
from flipscope.errors import FlipscopeError
from flipscope.fastpath import Prefix, run_prefix, score_shared_prefix
from flipscope.images import BlankSpec, load_image
from flipscope.prompts import IMAGE_CONDITIONS, PromptBuilder, PromptSpec
from flipscope.questions import Question
from flipscope.store import ResultStore, read_header, read_units

__all__ = ["EvalConfig", "merge_shards", "parse_shard", "run_sweep", "swap_images", "unit_order"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How an evaluation runs.

    Attributes:
        conditions: Image conditions, `image` first (see `flipscope.prompts`).
        blank: The blank stand-in (`gray`, `white` or `noise`) and `blank_seed` for noise.
        swap_seed: Seed of the pairing that gives each question another question's image.
        batch_size: Prompts per forward.
        questions_per_unit: Questions per unit of resumable work.
        generate_tokens: Also generate this many tokens greedily per prompt and parse the text
            with the keyword parser, as the paper computes flip rates (0: off).
        fast: Run prompts that share an image on one cached prefix (`flipscope.fastpath`): the
            vision tower and the template's pre-question tokens once per image, and once per run
            for the blank and no-image conditions. Off: plain left-padded batches of full prompts.
    """

    conditions: tuple[str, ...] = ("image", "blank")
    blank: str = "gray"
    blank_seed: int = 0
    swap_seed: int = 0
    batch_size: int = 32
    questions_per_unit: int = 16
    generate_tokens: int = 0
    fast: bool = True

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in IMAGE_CONDITIONS]
        if unknown:
            raise FlipscopeError(f"conditions {unknown} are unknown; expected some of {', '.join(IMAGE_CONDITIONS)}")
        if not self.conditions or self.conditions[0] != "image":
            raise FlipscopeError(f"conditions {list(self.conditions)} must start with 'image'")
        if len(set(self.conditions)) != len(self.conditions):
            raise FlipscopeError(f"conditions {list(self.conditions)} repeat")
        BlankSpec(kind=self.blank, seed=self.blank_seed)
        if self.batch_size < 1 or self.questions_per_unit < 1:
            raise FlipscopeError("batch_size and questions_per_unit must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        data = dict(data)
        data["conditions"] = tuple(data.get("conditions", ("image", "blank")))
        return cls(**data)


def swap_images(questions: Sequence[Question], seed: int) -> dict[str, Path]:
    """Each question's swap image: another question's image (a different file), by a seeded
    derangement over the questions."""
    order = np.random.default_rng(seed).permutation(len(questions))
    partner: dict[str, Path] = {}
    for rank, index in enumerate(order):
        question = questions[index]
        for step in range(1, len(order)):
            other = questions[order[(rank + step) % len(order)]]
            if other.image != question.image:
                partner[question.id] = other.image
                break
        else:
            raise FlipscopeError("condition 'swap' needs questions on at least two different images")
    return partner


def _fingerprint(questions: Sequence[Question]) -> str:
    """Hash of the questions and their images' bytes (not paths: the data folder may move)."""
    digest = hashlib.sha256()
    images: dict[Path, str] = {}
    for q in questions:
        if q.image not in images:
            images[q.image] = hashlib.sha256(Path(q.image).read_bytes()).hexdigest()
        digest.update(json.dumps([q.id, images[q.image], q.finding, q.answer, q.prompts, q.strategies]).encode())
    return digest.hexdigest()


def _model_identity(model: Any) -> dict[str, Any]:
    identity = getattr(model, "identity", None)
    if callable(identity):
        return identity()
    return {"name_or_path": getattr(model, "name_or_path", type(model).__name__)}


def _by_image(questions: Sequence[Question], swaps: dict[str, Path] | None) -> dict[Path, list[int]]:
    """Prompt indices (in unit order) grouped by the image their question shows."""
    groups: dict[Path, list[int]] = {}
    start = 0
    for q in questions:
        image = swaps[q.id] if swaps is not None else q.image
        groups.setdefault(image, []).extend(range(start, start + len(q.prompts)))
        start += len(q.prompts)
    return groups


def parse_shard(text: str) -> tuple[int, int]:
    """`"K/N"` → (K, N) with 0 ≤ K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise FlipscopeError(f"shard {text!r} is not K/N (e.g. 0/4)") from err
    if not 0 <= k < n:
        raise FlipscopeError(f"shard {text!r}: expected 0 <= K < N")
    return k, n


def unit_order(conditions: Sequence[str], n_questions: int, questions_per_unit: int) -> list[tuple[str, int]]:
    """Every unit of a run as (condition, question chunk), in the order a single process computes them."""
    n_chunks = -(-n_questions // questions_per_unit)
    return [(condition, index) for index in range(n_chunks) for condition in conditions]


def _unit_key(condition: str, index: int) -> str:
    return f"{condition}/{index}"


def run_sweep(
    model: Any,
    questions: Sequence[Question],
    cfg: EvalConfig,
    store_path: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> ResultStore:
    """Score every question's prompts under every condition into the store at `store_path`.

    `model` is anything with `processor` and `score(ModelInputs)` (`HookedVLM`, a clamped model).
    Rows: question_id, finding, truth, prompt_index (0 = original), kind, strategy, condition,
    margin, p_yes, entropy, answer; with `generate_tokens`, also generated, parsed (yes/no or
    None when excluded) and parse_reason. With `shard=(K, N)` only question chunks whose index is K
    modulo N are run (one shard per GPU or array task); `merge_shards` joins the N stores into the
    store a single process writes.
    """
    header = {
        "kind": "flip-evaluation",
        "eval_config": cfg.to_dict(),
        "model": _model_identity(model),
        "questions": {"n": len(questions), "sha256": _fingerprint(questions)},
        "shard": list(shard) if shard is not None else None,
    }
    fast = cfg.fast and hasattr(model, "hf_model")
    header["path"] = "shared-prefix" if fast else "batched"
    logger.info("evaluation path: %s", header["path"])
    store = ResultStore.open(store_path, header)
    builder = PromptBuilder(model.processor, blank=BlankSpec(kind=cfg.blank, seed=cfg.blank_seed))
    swaps = swap_images(questions, cfg.swap_seed) if "swap" in cfg.conditions else {}
    chunks = [questions[i : i + cfg.questions_per_unit] for i in range(0, len(questions), cfg.questions_per_unit)]
    units = unit_order(cfg.conditions, len(questions), cfg.questions_per_unit)
    if shard is not None:
        units = [(c, i) for c, i in units if i % shard[1] == shard[0]]
    todo = [(c, i) for c, i in units if _unit_key(c, i) not in store.done]
    if len(todo) < len(units):
        logger.info("resuming %s: %d of %d units already done", store_path, len(units) - len(todo), len(units))
    shared: dict[str, Prefix] = {}
    with torch.no_grad():
        for condition, index in tqdm(todo, desc="evaluating", disable=not progress):
            rows: list[dict[str, Any]] = []
            specs: list[PromptSpec] = []
            films: dict[Path, Any] = {}  # each film read once per unit, however many questions show it
            for q in chunks[index]:
                shown = q.image if condition == "image" else swaps[q.id] if condition == "swap" else None
                if shown is not None and shown not in films:
                    films[shown] = load_image(shown)
                image = films[shown] if condition == "image" else None
                swap = films[shown] if condition == "swap" else None
                for k, text in enumerate(q.prompts):
                    specs.append(PromptSpec(question=text, condition=condition, image=image, swap_image=swap))
                    rows.append(
                        {
                            "question_id": q.id,
                            "finding": q.finding,
                            "truth": "yes" if q.answer else "no",
                            "prompt_index": k,
                            "kind": "original" if k == 0 else "paraphrase",
                            "strategy": q.strategies[k - 1] if (k and q.strategies) else None,
                            "condition": condition,
                        }
                    )
            if fast:
                if condition in ("blank", "none"):  # one image slot for every question: once per run
                    if condition not in shared:
                        shared[condition] = run_prefix(model, builder, specs[0])
                    margins = score_shared_prefix(model, builder, specs, cfg.batch_size, shared[condition])
                else:  # one prefix per distinct image (questions about one film share it)
                    margins = torch.empty(len(specs))
                    for members in _by_image(chunks[index], swaps if condition == "swap" else None).values():
                        group = [specs[i] for i in members]
                        margins[members] = score_shared_prefix(model, builder, group, cfg.batch_size)
            else:
                margins = torch.cat(
                    [
                        model.score(builder.build(specs[i : i + cfg.batch_size]))
                        for i in range(0, len(specs), cfg.batch_size)
                    ]
                )
            if cfg.generate_tokens:
                texts = [
                    text
                    for i in range(0, len(specs), cfg.batch_size)
                    for text in model.generate(
                        builder.build(specs[i : i + cfg.batch_size]), max_new_tokens=cfg.generate_tokens
                    )
                ]
                for row, text in zip(rows, texts, strict=True):
                    parsed = parse_answer(text)
                    row.update(generated=text, parsed=parsed.answer, parse_reason=parsed.reason)
            for row, margin, prob, entropy in zip(
                rows, margins.tolist(), p_yes(margins).tolist(), binary_entropy(margins).tolist(), strict=True
            ):
                row.update(margin=margin, p_yes=prob, entropy=entropy, answer="yes" if margin > 0 else "no")
            store.append(_unit_key(condition, index), rows)
    return store


def merge_shards(paths: Sequence[str | Path], out: str | Path) -> ResultStore:
    """Join the stores of shards 0..N-1 of one run into the store one process would have written.

    Raises:
        FlipscopeError: the stores are not all shards of one run, a shard is missing or unfinished.
    """
    headers = [read_header(p) for p in paths]
    base = {k: v for k, v in headers[0].items() if k != "shard"}
    shards = []
    for path, header in zip(paths, headers, strict=True):
        if {k: v for k, v in header.items() if k != "shard"} != base:
            raise FlipscopeError(f"{str(path)!r} is not a shard of the same run as {str(paths[0])!r}")
        if header.get("shard") is None:
            raise FlipscopeError(f"{str(path)!r} is not a shard (no shard in its header)")
        shards.append(tuple(header["shard"]))
    n = shards[0][1]
    if sorted(shards) != [(k, n) for k in range(n)]:
        raise FlipscopeError(f"shards {sorted(shards)} are not exactly 0/{n} .. {n - 1}/{n}")
    units: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        units.update(read_units(path))
    cfg = base["eval_config"]
    order = [
        _unit_key(c, i) for c, i in unit_order(cfg["conditions"], base["questions"]["n"], cfg["questions_per_unit"])
    ]
    missing = [u for u in order if u not in units]
    if missing:
        raise FlipscopeError(f"{len(missing)} unit(s) unfinished in the shards (e.g. {missing[0]}); rerun them first")
    merged = ResultStore.open(out, {k: (None if k == "shard" else v) for k, v in headers[0].items()})
    for unit in order:
        if unit not in merged.done:
            merged.append(unit, units[unit])
    return merged
