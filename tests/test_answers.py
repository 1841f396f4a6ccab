"""Yes/no token resolution, margins, probabilities and the keyword parser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flipscope.errors import FlipscopeError
from flipscope.model.answers import AnswerTokens, binary_entropy, p_yes, parse_answer, yes_no_margin
from flipscope.model.tiny import build_processor


def test_tokens_resolve_to_single_known_ids(vlm) -> None:
    tokens = vlm.answer_tokens
    tokenizer = vlm.processor.tokenizer
    # The word-level tokenizer lower-cases, so every spelling lands on the one "yes" / "no" id.
    assert tokens.yes_ids == (tokenizer.convert_tokens_to_ids("yes"),)
    assert tokens.no_ids == (tokenizer.convert_tokens_to_ids("no"),)
    assert tokenizer.unk_token_id not in tokens.yes_ids + tokens.no_ids


def test_tokenizer_without_yes_is_refused() -> None:
    processor = build_processor(["no", "maybe"], image_size=32, mm_tokens_per_image=4)
    with pytest.raises(FlipscopeError, match="no single-token spelling of yes"):
        AnswerTokens.from_tokenizer(processor.tokenizer)


def test_margin_sums_probability_over_spellings() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    tokens = AnswerTokens(yes_ids=(0, 1), no_ids=(2,))
    expected = math.log(math.exp(2.0) + math.exp(1.0)) - 0.5
    torch.testing.assert_close(yes_no_margin(logits, tokens), torch.tensor([expected]))
    single = AnswerTokens(yes_ids=(4,), no_ids=(3,))
    torch.testing.assert_close(yes_no_margin(logits, single), torch.tensor([4.0]))
    with pytest.raises(FlipscopeError, match="both yes and no"):
        AnswerTokens(yes_ids=(1, 2), no_ids=(2,))


def test_probability_and_entropy() -> None:
    margins = torch.tensor([0.0, 40.0, -40.0, math.log(3.0)])
    torch.testing.assert_close(p_yes(margins), torch.tensor([0.5, 1.0, 0.0, 0.75]))
    entropy = binary_entropy(margins)
    torch.testing.assert_close(entropy[0], torch.tensor(1.0))
    assert float(entropy[1]) < 1e-6 and float(entropy[2]) < 1e-6
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    torch.testing.assert_close(entropy[3], torch.tensor(expected))


def test_shapes_are_checked_at_runtime() -> None:
    with pytest.raises(Exception, match="(?i)type|shape"):
        p_yes(np.zeros(3))


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes.", "yes"),
        ("Yes, an effusion is present.", "yes"),
        ("The finding is clearly evident", "yes"),
        ("No.", "no"),
        ("Effusion not seen; the study is normal.", "no"),
        ("The lungs are clear", "no"),
        ("NEGATIVE", "no"),
    ],
)
def test_keyword_parser(text: str, answer: str) -> None:
    assert parse_answer(text).answer == answer


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Yes, but the costophrenic angle is clear.", "both"),
        ("The image shows no effusion.", "both"),
        ("Possibly.", "no affirmative or negative keyword"),
        ("", "no affirmative or negative keyword"),
        ("It is unclear; abnormality cannot be excluded", "no affirmative or negative keyword"),
    ],
)
def test_keyword_parser_excludes_with_reason(text: str, reason: str) -> None:
    parsed = parse_answer(text)
    assert parsed.answer is None and reason in parsed.reason
