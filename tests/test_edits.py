"""Edited models share the weights and apply their edit exactly once per forward, on every path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flipscope.interventions.edited import ClampedVLM, DirectionAblatedVLM
from flipscope.model.answers import AnswerTokens, head_margin, yes_no_margin
from flipscope.model.hooked import Edit, HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism import load_organism

QUESTIONS = ("Is the suspected opacity there?", "Is there a pneumothorax?", "Is there an effusion?")
PATHS = (
    "score", "forward", "run_with_cache", "run_with_hooks", "hooks_then_score", "nested_hooks", "shared_prefix",
    "last_token", "generate",
)  # fmt: skip


@pytest.fixture(scope="module")
def organism():
    vlm, sae, card = load_organism()
    film = Path(__file__).parents[1] / "flipbank" / "organism" / "images" / "film0001.png"
    return vlm, sae, card, film


class Counter:
    """A hook that counts its calls and changes nothing."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, hook) -> torch.Tensor:
        self.calls += 1
        return x


@contextmanager
def forwards(vlm: HookedVLM) -> Iterator[list[int]]:
    """Counts forward passes of the language model (one per prefill, KV step or decoding step)."""
    count = [0]
    handle = vlm.hf_model.model.language_model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def _paths(model: HookedVLM, film: Path, user: list) -> dict:
    """Every scoring path, each a thunk that runs it."""
    image = [PromptSpec(question=q, image=film) for q in QUESTIONS]
    batch = model.prompts.build(image)
    hook = user[0][0]

    def hooks_then_score():
        with model.hooks(fwd_hooks=user):
            return model.score(batch)

    def nested_hooks():
        with model.hooks(fwd_hooks=user), model.hooks():
            return model.run_with_hooks(batch)

    return {
        "score": lambda: model.score(batch),
        "forward": lambda: model(batch),
        "run_with_cache": lambda: model.run_with_cache(batch, names_filter=hook),
        "run_with_hooks": lambda: model.run_with_hooks(batch, fwd_hooks=user),
        "hooks_then_score": hooks_then_score,
        "nested_hooks": nested_hooks,
        "shared_prefix": lambda: model.score_shared_prefix(image, batch_size=2),
        "last_token": lambda: model.score_last_token(image, 3, fwd_hooks=user),
        "generate": lambda: model.generate(batch, max_new_tokens=3),
    }


@pytest.mark.parametrize("kind", ["clamped", "ablated"])
def test_every_hook_site_fires_once_per_forward_on_every_path(organism, kind: str) -> None:
    vlm, sae, card, film = organism
    hook = card["hook_name"]
    if kind == "clamped":
        edited = ClampedVLM(vlm, sae, {card["framing_features"][0]["feature"]: 0.0})
    else:
        edited = DirectionAblatedVLM(vlm, hook, torch.ones(vlm.d_model))
    edit_count = Counter()
    counted = edited.edited(Edit(hook, edit_count, {}))  # fires wherever the edited model's edit fires
    for name in PATHS:
        user = Counter()
        run = _paths(counted, film, [(hook, user)])[name]
        edit_count.calls = 0
        with forwards(counted) as n:
            run()
        assert edit_count.calls == n[0], f"{name}: edit fired {edit_count.calls} times in {n[0]} forwards"
        if name in ("hooks_then_score", "run_with_hooks", "nested_hooks"):
            assert user.calls == n[0] == 1, f"{name}: user hook fired {user.calls} times in {n[0]} forwards"
        if name == "last_token":
            assert user.calls == 1 and n[0] == 2  # the prefix once without it, the last token once with it
    assert not any(p.fwd_hooks for p in vlm.hook_dict.values())
    assert not any(p.fwd_hooks for p in counted.hook_dict.values())


def test_an_edit_inside_hooks_is_not_applied_twice(organism) -> None:
    vlm, sae, card, film = organism
    clamped = ClampedVLM(vlm, sae, {card["framing_features"][0]["feature"]: 4.0})
    batch = vlm.prompts.build([PromptSpec(question=q, image=film) for q in QUESTIONS])
    alone = clamped.score(batch)
    with clamped.hooks():
        inside = clamped.score(batch)
    assert torch.equal(alone, inside)
    assert (alone - vlm.score(batch)).abs().max() > 0.1  # the clamp does move the margins
    specs = [PromptSpec(question=q, image=film) for q in QUESTIONS]
    torch.testing.assert_close(clamped.score_last_token(specs, 2)[:, 0], alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(clamped.score_shared_prefix(specs), alone, atol=1e-4, rtol=0)


def test_siblings_share_weights_and_leave_the_model_as_it_is(organism) -> None:
    vlm, sae, card, film = organism
    clamped = ClampedVLM(vlm, sae, {card["framing_features"][0]["feature"]: 0.0})
    assert clamped.hf_model is vlm.hf_model and clamped.prompts is vlm.prompts and not vlm.edits
    assert clamped.model is vlm and clamped.identity()["clamp"]["values"] and "clamp" not in vlm.identity()
    twice = ClampedVLM(clamped, sae, {0: 0.0})
    assert len(twice.edits) == 2 and "clamp" not in twice.identity()
    assert [e["clamp"]["values"] for e in twice.identity()["edits"]] == [clamped.values, {0: 0.0}]


def test_unembedding_the_last_token_alone_gives_the_hf_logits(organism) -> None:
    vlm, _, _, film = organism
    batch = vlm.prompts.build([PromptSpec(question=q, image=film) for q in QUESTIONS])
    kwargs = batch.as_kwargs()
    hidden = vlm.hf_hidden(**kwargs, use_cache=False).last_hidden_state[:, -1]
    logits = vlm.hf_model(**kwargs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(vlm.unembed(hidden), logits, atol=1e-5, rtol=0)  # the same product, fewer rows
    # the margin from the answer tokens' rows alone is the full logits' margin
    torch.testing.assert_close(vlm.answer_margin(hidden), yes_no_margin(logits, vlm.answer_tokens), atol=1e-5, rtol=0)
    head = torch.nn.Linear(16, 50)  # a biased head, several spellings of each answer
    tokens, states = AnswerTokens(yes_ids=(3, 7, 41), no_ids=(0, 12)), torch.randn(4, 5, 16)
    full = yes_no_margin(head(states), tokens)
    torch.testing.assert_close(head_margin(states, head, tokens), full, atol=1e-5, rtol=0)
    assert full.shape == (4, 5) and full.std() > 0.01
