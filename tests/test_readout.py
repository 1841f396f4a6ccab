"""The answer direction moves the margin as the logit lens says, and feature alignment reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.experiments.readout import answer_alignment, answer_direction, residual_rows
from flipscope.model.answers import yes_no_margin
from flipscope.model.hook_names import resid_post
from flipscope.model.prompts import PromptSpec
from flipscope.organism import load_organism
from flipscope.sae.load import check_sae, load_sae


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


def test_an_attention_saes_rows_are_read_where_they_enter_the_residual_stream(organism, tmp_path) -> None:
    """A row added to the heads' outputs (`attn.hook_z`) moves the output projection's output along
    the projected row exactly, and layer 0's attention output (what Gemma adds to the residual
    stream, after its post-attention norm) closer to `residual_rows` — the projected row times the
    norm's gain — than to the projected row alone, under a gain made far from uniform. The norm's
    1/rms and its projection off the activation are left out: a first-order reading."""
    from tests.test_sae import _raw_folder

    vlm, sae, batch = organism
    heads = load_sae(_raw_folder(tmp_path, layer=0, d_in=vlm.d_model, site="attn_out")[0])
    hook = check_sae(heads, vlm)
    torch.testing.assert_close(residual_rows(sae, vlm, check_sae(sae, vlm)), sae.W_dec.detach().float())
    layer = vlm.hf_model.model.language_model.layers[0]
    projected = heads.W_dec.detach().float() @ layer.self_attn.o_proj.weight.detach().float().T
    names = ["blocks.0.ln1_post.hook_in", "blocks.0.hook_attn_out"]
    norm, saved = layer.post_attention_layernorm, layer.post_attention_layernorm.weight.detach().clone()
    with_gain, without = [], []
    try:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(saved.shape, generator=torch.Generator().manual_seed(0)) * 3 - 1)
        rows = residual_rows(heads, vlm, hook)
        _, clean = vlm.run_with_cache(batch, names_filter=names)
        for f in range(8):

            def nudge(z, hook, f=f):
                z = z.clone()
                z[:, -1] += 1e-3 * heads.W_dec[f].detach().to(z)
                return z

            with vlm.hooks(fwd_hooks=[(hook, nudge)]):
                _, moved = vlm.run_with_cache(batch, names_filter=names)
            into, out = ((moved[n] - clean[n])[:, -1] for n in names)
            assert float(_cos(into, projected[f]).min()) > 0.9999  # the projection is linear
            with_gain.append(float(_cos(out, rows[f]).mean()))
            without.append(float(_cos(out, projected[f]).mean()))
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)
    assert np.mean(with_gain) > np.mean(without) + 0.1, (with_gain, without)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1)


def test_discovery_reads_an_attention_saes_alignment_through_the_projection(organism, tmp_path) -> None:
    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.discovery import discover
    from tests.test_sae import _raw_folder

    vlm, _, _ = organism
    bank = load_flipbank(Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json")
    heads = load_sae(_raw_folder(tmp_path, layer=0, d_in=vlm.d_model, site="attn_out")[0])
    found = discover(vlm, heads, bank, layers=[], exact_top=0, progress=False)  # family-matched pairs: the whole bank
    assert found.hook == "blocks.0.attn.hook_z"
    table = found.table.sort_values("feature")
    expected = answer_alignment(heads, vlm, found.hook)
    np.testing.assert_allclose(table["answer_cos"].to_numpy(), expected[table["feature"].to_numpy()], atol=1e-6)
    raw = heads.W_dec.detach().float() / heads.W_dec.detach().float().norm(dim=1, keepdim=True)
    assert np.abs(expected - (raw @ answer_direction(vlm)).numpy()).max() > 0.1  # not the raw rows' cosine
