"""Reading a yes/no answer off the model.

Two readings, as in the PSF-Med paper:

- **Margin** (the default): the yes-minus-no logit margin of the first answer token at the last
  prompt position; `margin > 0` means yes. Tokenizers spell the answer several ways ("Yes",
  "yes", with or without a leading space, SentencePiece's "▁Yes"). `AnswerTokens.from_tokenizer`
  keeps every spelling in `YES_SPELLINGS`/`NO_SPELLINGS` that encodes to exactly one known token
  (not the unknown token), de-duplicated; the margin is
  `logsumexp(logits[yes ids]) − logsumexp(logits[no ids])`, i.e. the log-odds of yes against no
  with the probability of each answer summed over its spellings. With one spelling each it is the
  plain logit difference. `p_yes = sigmoid(margin)` is the 2-way probability.
- **Keyword parse** of a generated answer: affirmative keywords (yes, present, visible, confirmed,
  shows, evident) vs negative ones (no, absent, not seen, negative, normal, clear), matched as
  whole words, case-insensitively. Both kinds or neither → excluded, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from flipscope.data.keywords import AFFIRMATIVE_KEYWORDS, NEGATIVE_KEYWORDS, ParsedAnswer, parse_answer
from flipscope.errors import FlipscopeError

__all__ = [
    "AFFIRMATIVE_KEYWORDS",
    "NEGATIVE_KEYWORDS",
    "NO_SPELLINGS",
    "YES_SPELLINGS",
    "AnswerTokens",
    "ParsedAnswer",
    "binary_entropy",
    "head_margin",
    "p_yes",
    "parse_answer",
    "require_finite",
    "yes_no_margin",
]

YES_SPELLINGS: tuple[str, ...] = ("Yes", "yes", "YES", " Yes", " yes", "▁Yes", "▁yes")
NO_SPELLINGS: tuple[str, ...] = ("No", "no", "NO", " No", " no", "▁No", "▁no")


def _single_token_ids(tokenizer: Any, spellings: tuple[str, ...]) -> tuple[int, ...]:
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab = tokenizer.get_vocab()
    found: list[int] = []
    for spelling in spellings:
        candidates: list[int] = []
        if spelling in vocab:
            candidates.append(int(vocab[spelling]))
        ids = tokenizer.encode(spelling, add_special_tokens=False)
        if len(ids) == 1:
            candidates.append(int(ids[0]))
        for token_id in candidates:
            if token_id != unk and token_id not in found:
                found.append(token_id)
    return tuple(found)


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids that begin a yes answer and a no answer."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        overlap = set(self.yes_ids) & set(self.no_ids)
        if overlap:
            raise FlipscopeError(f"token ids {sorted(overlap)} count as both yes and no")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> AnswerTokens:
        """Resolve yes/no ids from `tokenizer` (rule in the module docstring).

        Raises:
            FlipscopeError: the tokenizer has no single-token spelling of yes or of no.
        """
        yes_ids = _single_token_ids(tokenizer, YES_SPELLINGS)
        no_ids = _single_token_ids(tokenizer, NO_SPELLINGS)
        missing = [name for name, ids in (("yes", yes_ids), ("no", no_ids)) if not ids]
        if missing:
            raise FlipscopeError(
                f"tokenizer {type(tokenizer).__name__} has no single-token spelling of {' or '.join(missing)} "
                f"(tried {', '.join(map(repr, YES_SPELLINGS + NO_SPELLINGS))})"
            )
        return cls(yes_ids, no_ids)


def yes_no_margin(logits: Float[Tensor, "*batch d_vocab"], tokens: AnswerTokens) -> Float[Tensor, "*batch"]:
    """Yes-minus-no margin from next-token logits (log-odds of yes against no)."""
    logits = logits.float()
    yes = torch.logsumexp(logits[..., list(tokens.yes_ids)], dim=-1)
    no = torch.logsumexp(logits[..., list(tokens.no_ids)], dim=-1)
    return yes - no


def head_margin(
    hidden: Float[Tensor, "*batch d_model"], head: torch.nn.Module, tokens: AnswerTokens, cap: float | None = None
) -> Float[Tensor, "*batch"]:
    """`yes_no_margin(head(hidden), tokens)` from the answer tokens' rows of the unembedding alone
    (the logits soft-capped at `cap` first, as a forward that caps them does): the margin reads
    two logits, and at a 262,208-token vocabulary the full product costs about 1.3 GFLOP and 1 MB
    a row (for the last token of a 34-layer MedGemma, a sixth of its forward)."""
    ids = [*tokens.yes_ids, *tokens.no_ids]
    bias = getattr(head, "bias", None)
    logits = torch.nn.functional.linear(hidden, head.weight[ids], None if bias is None else bias[ids])
    if cap:
        logits = torch.tanh(logits / cap) * cap
    n_yes = len(tokens.yes_ids)
    return yes_no_margin(logits, AnswerTokens(tuple(range(n_yes)), tuple(range(n_yes, len(ids)))))


def p_yes(margin: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """2-way probability of yes given the margin."""
    return torch.sigmoid(margin)


def binary_entropy(margin: Float[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """Entropy (bits) of the 2-way yes/no distribution; 1 bit at margin 0, → 0 when confident."""
    log_p = torch.nn.functional.logsigmoid(margin)
    log_q = torch.nn.functional.logsigmoid(-margin)
    return -(log_p.exp() * log_p + log_q.exp() * log_q) / math.log(2.0)


def require_finite(margins: Float[Tensor, " n"], names: Any, what: str = "margin") -> None:
    """Refuse non-finite margins: NaN or ±inf (NaN weights, a bf16/fp16 overflow) is never an answer.

    `names(i)` says which prompt row i is (question, prompt, condition) for the error.

    Raises:
        FlipscopeError: naming the first non-finite row and how many there are.
    """
    bad = (~torch.isfinite(margins.detach())).nonzero().flatten().tolist()
    if bad:
        raise FlipscopeError(
            f"non-finite {what} ({float(margins[bad[0]])}) for {names(bad[0])}"
            + (f" and {len(bad) - 1} more row(s)" if len(bad) > 1 else "")
            + "; the model (or intervention) gives no answer there: check the weights, dtype (float16 overflows) "
            "and any SAE or clamp value; nothing of this unit was recorded"
        )
