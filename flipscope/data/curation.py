"""Curating a FlipBank from an evaluation: the paper's rules as options, matched controls.

The rules: the answer with the image changes between original and paraphrase; both answers are
confident (|margin| ≥ `min_margin`; with parsed generated answers, both parse without hedges);
optionally a paraphrase-similarity threshold when rows carry a `similarity` column. Controls
are drawn deterministically (seeded), up to `controls_per_flip` per flip, by one of two rules:

- `match="family"` (the default): each flip gets its own control, a non-flip paraphrase of the same family
  (strategy) and finding, on the same image where one exists; a flip with none left is counted in
  the bank's `control_shortfall`, never filled from another family. A framing feature shifts on
  such a control too; an answer-readout feature does not, which is what tells the two apart;
- `match="question"`: from the non-flip paraphrases of the flipped questions, any family (the
  paper's draw; a control of another family mixes a second wording into the comparison).

An answer-inverting paraphrase (its question's relation `inverted`) flips when its answer *equals*
the original's. A bank case is read in the original's frame by every later stage (the margin shift
to undo, the answer to restore), so such paraphrases are left out of the cases and counted instead
(`inverted`: how many, and how many of them broke their relation).

Rows are read in one pass and kept as compact tuples, so a store can be streamed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from flipscope.data.flipbank import FLIPBANK_FORMAT, FlipBank, FlipCase, check_questions_digest
from flipscope.data.questions import Question
from flipscope.errors import FlipscopeError

__all__ = ["MATCHES", "CurationRules", "curate"]

logger = logging.getLogger(__name__)
MATCHES = ("question", "family")


@dataclass(frozen=True, kw_only=True)
class CurationRules:
    """How flip cases are chosen.

    Attributes:
        min_margin: Both margins at least this far from 0 (the answers are confident).
        use_generated: Require both generated answers to parse without hedges, and to flip.
        min_similarity: Keep only paraphrases with `similarity` ≥ this (rows must carry it).
        controls_per_flip: Non-flip controls drawn per flip case.
        seed: Seed of the control draw.
        match: How controls are drawn: `question` or `family` (see the module docstring).
    """

    min_margin: float = 0.0
    use_generated: bool = False
    min_similarity: float | None = None
    controls_per_flip: int = 1
    seed: int = 0
    match: str = "family"

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise FlipscopeError(f"control match {self.match!r} is unknown; expected one of {', '.join(MATCHES)}")
        if self.controls_per_flip < 0:
            raise FlipscopeError(f"controls_per_flip {self.controls_per_flip} is negative")
        if not self.min_margin >= 0:
            raise FlipscopeError(f"min_margin {self.min_margin} is negative; expected 0 or more (a distance from 0)")

    def to_dict(self) -> dict[str, Any]:
        """The rules as a bank records them (banks without `match` predate the option and were
        curated with `question`)."""
        return asdict(self)


class _Answer(NamedTuple):
    """What curation reads of one with-image row."""

    question_id: str
    prompt_index: int
    answer: str
    judged: str | None  # the answer the rules compare: `answer`, or `parsed` with use_generated
    margin: float
    strategy: str | None
    similarity: float | None


def _answers(rows: Iterable[Mapping[str, Any]], rules: CurationRules) -> list[_Answer]:
    key = "parsed" if rules.use_generated else "answer"
    out = []
    for r in rows:
        if r["condition"] not in ("image", "context"):  # the evidence shown: an image, or a text model's passage
            continue
        if r.get("margin") is None:
            raise FlipscopeError(
                f"question {r['question_id']!r}, prompt {r['prompt_index']}: no margin (an answer table imported "
                "without margins); a FlipBank records both margins, so curate from a run that has them"
            )
        similarity = r.get("similarity")
        if rules.min_similarity is not None and r["prompt_index"] and similarity is None:
            raise FlipscopeError("min_similarity needs a 'similarity' value on every row")
        out.append(_Answer(r["question_id"], r["prompt_index"], r["answer"], r.get(key), r["margin"],
                           r.get("strategy"), similarity))  # fmt: skip
    return out


Pair = tuple[_Answer, _Answer]  # a question's original and one of its paraphrases


def _case_id(question_id: str, prompt_index: int) -> str:
    return f"{question_id}/p{prompt_index}"


def _case(q: Question, original: _Answer, para: _Answer) -> FlipCase:
    case = FlipCase(
        {
            "id": _case_id(q.id, para.prompt_index),
            "question_id": q.id,
            "image": None if q.image is None else str(q.image),
            "finding": q.finding,
            "truth": "yes" if q.answer else "no",
            "original": q.question,
            "paraphrase": q.prompts[para.prompt_index],
            "prompt_index": int(para.prompt_index),
            "strategy": para.strategy,
            "original_answer": original.answer,
            "paraphrase_answer": para.answer,
            "original_margin": float(original.margin),
            "paraphrase_margin": float(para.margin),
        }
    )
    if q.context is not None:
        case["context"] = q.context
    if case["original_answer"] != case["paraphrase_answer"]:
        case["direction"] = f"{case['original_answer']}→{case['paraphrase_answer']}"
    return case


def _kept(original: _Answer, para: _Answer, rules: CurationRules) -> bool:
    if original.judged is None or para.judged is None:
        return False
    if min(abs(original.margin), abs(para.margin)) < rules.min_margin:
        return False
    return rules.min_similarity is None or para.similarity >= rules.min_similarity


def _question_matched(flips: list[Pair], candidates: list[Pair], rules: CurationRules) -> list[tuple]:
    """Controls drawn at random from the flipped questions' non-flip paraphrases (any family)."""
    flipped_questions = {para.question_id for _, para in flips}
    pool = [c for c in candidates if c[1].question_id in flipped_questions] or candidates
    rng = np.random.default_rng(rules.seed)
    n_controls = min(len(pool), len(flips) * rules.controls_per_flip)
    chosen = sorted(rng.choice(len(pool), size=n_controls, replace=False)) if n_controls else []
    return [(*pool[i], None) for i in chosen]


def _family_matched(
    flips: list[Pair], candidates: list[Pair], by_id: Mapping[str, Question], rules: CurationRules
) -> tuple[list[tuple], int]:
    """Per flip, `controls_per_flip` non-flips of its family and finding (its image first), each
    used once; and how many flips found none left."""
    rng = np.random.default_rng(rules.seed)
    pools: dict[tuple, list[Pair]] = {}
    for pair in candidates:
        q = by_id[pair[1].question_id]
        pools.setdefault((pair[1].strategy, q.finding), []).append(pair)
    chosen, shortfall = [], 0
    for _, para in flips:
        q = by_id[para.question_id]
        pool = pools.get((para.strategy, q.finding), [])
        for _ in range(rules.controls_per_flip):
            if not pool:
                shortfall += 1
                break
            same_image = [i for i, c in enumerate(pool) if _evidence(by_id[c[1].question_id]) == _evidence(q)]
            tier = same_image or range(len(pool))
            control = pool.pop(tier[int(rng.integers(len(tier)))])
            chosen.append((*control, _case_id(q.id, para.prompt_index)))
    return chosen, shortfall


def _evidence(q: Question) -> tuple[Any, Any]:
    return q.image, q.context


def _control(by_id: Mapping[str, Question], original: _Answer, para: _Answer, flip: str | None) -> FlipCase:
    case = _case(by_id[para.question_id], original, para)
    if flip is not None:
        case["control_for"] = flip
    return case


def curate(
    rows: Iterable[Mapping[str, Any]],
    questions: Sequence[Question],
    rules: CurationRules,
    *,
    source: Mapping[str, Any],
    questions_sha256: str | None = None,
    allow_edited_questions: bool = False,
) -> FlipBank:
    """A FlipBank from evaluation rows (a list, or `iter_rows(path)` to stream a store; the
    condition that shows the evidence is read: `image`, or a text model's `context`) by `rules`;
    `source` records the model and evaluation (e.g. the store header).

    `questions_sha256` is the fingerprint of `questions` as an evaluation records it
    (`flipscope.experiments.evaluation.questions_fingerprint`): a questions file edited since the
    evaluation would pair its new wording with the old margins, so it is refused unless
    `allow_edited_questions`, and then the bank records both digests (`questions_edited`).

    Raises:
        FlipscopeError: the questions differ from those the evaluation ran on.
    """
    edited = check_questions_digest(source, questions_sha256, allow=allow_edited_questions)
    by_id = {q.id: q for q in questions}
    answers = _answers(rows, rules)
    originals = {a.question_id: a for a in answers if a.prompt_index == 0}
    flips: list[Pair] = []
    candidates: list[Pair] = []
    inverted = {"n": 0, "n_broken": 0}
    for para in sorted(answers, key=lambda a: (a.question_id, a.prompt_index)):
        if para.prompt_index == 0 or para.question_id not in by_id:
            continue
        original = originals[para.question_id]
        if by_id[para.question_id].inverted(para.prompt_index):
            inverted["n"] += 1
            inverted["n_broken"] += int(original.judged is not None and original.judged == para.judged)
            continue
        if _kept(original, para, rules):
            (flips if original.judged != para.judged else candidates).append((original, para))
    if rules.match == "family":
        chosen, shortfall = _family_matched(flips, candidates, by_id, rules)
    else:
        chosen, shortfall = _question_matched(flips, candidates, rules), None
    bank = FlipBank(
        {
            "format": FLIPBANK_FORMAT,
            "rules": rules.to_dict(),
            "source": dict(source),
            "n_flips": len(flips),
            "n_controls": len(chosen),
            "flips": [_case(by_id[p.question_id], o, p) for o, p in flips],
            "controls": [_control(by_id, o, p, flip) for o, p, flip in chosen],
        }
    )
    if inverted["n"]:
        bank["inverted"] = inverted
        logger.info(
            "%d answer-inverting paraphrases left out of the bank (%d broke their relation)", *inverted.values()
        )
    if questions_sha256 is not None:
        bank["questions_sha256"] = questions_sha256
    if edited:
        bank["questions_edited"] = edited
    if shortfall is not None:
        bank["control_shortfall"] = shortfall
        if shortfall:
            logger.warning("%d of %d flips have no non-flip control of their own family left", shortfall, len(flips))
    return bank
