"""The answer direction moves the margin as the logit lens says, and feature alignment reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flipscope.experiments.readout import answer_alignment, answer_direction
from flipscope.model.answers import yes_no_margin
from flipscope.model.hook_names import resid_post
from flipscope.model.prompts import PromptSpec
from flipscope.organism import load_organism


@pytest.fixture(scope="module")
def organism():
    vlm, sae, card = load_organism()
    specs = [PromptSpec(question=q, condition="blank") for q in ("Is there an effusion?", "Is the lung clear?")]
    return vlm, sae, vlm.prompts.build(specs)


@torch.no_grad()
def _shifted(vlm, batch, vector: torch.Tensor) -> torch.Tensor:
    """Margins with `vector` (scaled to 10% of each row's residual norm) added at the final norm's
    input, last position."""

    def add(x, hook):
        x = x.clone()
        x[:, -1] += 0.1 * x[:, -1].norm(dim=-1, keepdim=True) * vector / vector.norm()
        return x

    logits = vlm.run_with_hooks(batch, fwd_hooks=[(resid_post(vlm.n_layers - 1), add)], logits_to_keep=1)
    return yes_no_margin(logits[:, -1], vlm.answer_tokens)


def test_the_answer_direction_raises_the_margin_far_more_than_random_directions(organism) -> None:
    vlm, _, batch = organism
    u = answer_direction(vlm)
    assert u.shape == (vlm.d_model,) and torch.isclose(u.norm(), torch.tensor(1.0))
    base = vlm.score(batch)
    up, down = (_shifted(vlm, batch, sign * u) - base for sign in (1.0, -1.0))
    assert (up > 0).all() and (down < 0).all()
    rng = torch.Generator().manual_seed(0)
    random = [(_shifted(vlm, batch, torch.randn(vlm.d_model, generator=rng)) - base).abs().mean() for _ in range(10)]
    assert float(up.abs().mean()) > 3 * float(torch.stack(random).mean())


def test_feature_alignment_is_the_decoder_cosine_and_predicts_the_sign(organism) -> None:
    vlm, sae, batch = organism
    cos = answer_alignment(sae, vlm)
    rows = sae.W_dec.detach().float()
    expected = (rows / rows.norm(dim=1, keepdim=True)) @ answer_direction(vlm)
    np.testing.assert_allclose(cos, expected.numpy(), atol=1e-6)
    assert cos.shape == (sae.cfg.d_sae,) and np.abs(cos).max() <= 1 + 1e-6
    base = vlm.score(batch)
    for feature in np.argsort(-np.abs(cos))[:3]:
        moved = _shifted(vlm, batch, rows[feature]) - base
        assert np.sign(float(moved.mean())) == np.sign(cos[feature])
