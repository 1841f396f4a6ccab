"""HookedVLM against the plain HF forward it wraps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flipscope.errors import FlipscopeError
from flipscope.model import HookedVLM, PromptSpec
from flipscope.model.hook_points import check_activation_hook, check_positions, is_pattern_hook
from flipscope.model.hooked import SiteHookPoint as _SiteHookPoint

QUESTIONS = ("Is there an effusion?", "Do you see any pleural effusion in this film?", "Are the lungs clear?")


@pytest.fixture(scope="module")
def mixed_batch(vlm: HookedVLM, film_paths: dict[str, Path]):
    specs = [
        PromptSpec(question=QUESTIONS[0], image=film_paths["gray"]),
        PromptSpec(question=QUESTIONS[1], condition="blank"),
        PromptSpec(question=QUESTIONS[2], condition="none"),
        PromptSpec(question=QUESTIONS[1], condition="swap", swap_image=film_paths["other"]),
    ]
    return specs, vlm.prompts.build(specs)


def _no_site_hooks(vlm: HookedVLM) -> bool:
    """No flipscope hook is left on an HF module or a HookPoint (HF's own capture hooks aside)."""
    ours = [
        fn
        for module in vlm.hf_model.modules()
        for fn in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
        if isinstance(getattr(fn, "__self__", None), _SiteHookPoint)
    ]
    points = all(not hp.fwd_hooks and not hp.bwd_hooks for hp in vlm.hook_dict.values())
    return not ours and points


@pytest.mark.parametrize("condition", ["image", "blank", "none", "mixed"])
def test_logits_bit_identical_to_hf(vlm: HookedVLM, film_paths, mixed_batch, condition: str) -> None:
    if condition == "mixed":
        batch = mixed_batch[1]
    else:
        batch = vlm.prompts.build(
            [PromptSpec(question=q, image=film_paths["gray"], condition=condition) for q in QUESTIONS]
        )
    with torch.no_grad():
        plain = vlm.hf_model(**batch.as_kwargs()).logits
        unhooked = vlm(batch)
        with vlm.hooks(fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: x)]):
            identity = vlm(batch)
        with vlm.hooks(fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: None)]):
            observe = vlm(batch)
    assert torch.equal(plain, unhooked)
    assert torch.equal(plain, identity)
    assert torch.equal(plain, observe)
    assert _no_site_hooks(vlm)


def test_default_attention_is_hf_fast_path(vlm: HookedVLM) -> None:
    assert vlm.hf_model.config._attn_implementation == "sdpa"


def test_resid_post_equals_hf_hidden_states(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    with torch.no_grad():
        hidden = vlm.hf_model(**batch.as_kwargs(), output_hidden_states=True).hidden_states
    _, cache = vlm.run_with_cache(batch)
    last = vlm.n_layers - 1
    for layer in range(last):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1]), layer
        assert torch.equal(cache[f"blocks.{layer + 1}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"])
    assert torch.equal(cache["blocks.0.hook_resid_pre"], hidden[0])
    # HF's last hidden state is taken after the final norm.
    assert torch.equal(cache["ln_final.hook_normalized"], hidden[-1])
    norm = vlm.hf_model.model.language_model.norm
    assert torch.equal(norm(cache[f"blocks.{last}.hook_resid_post"]), hidden[-1])


def test_attn_and_mlp_out_are_the_residual_updates(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: name.startswith("blocks."))
    for layer in range(vlm.n_layers):
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        rebuilt = (pre + cache[f"blocks.{layer}.hook_attn_out"]) + cache[f"blocks.{layer}.hook_mlp_out"]
        assert torch.equal(rebuilt, post), layer


def test_hook_z_is_every_heads_output_before_the_projection(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: name.startswith("blocks.0."))
    layer = vlm.hf_model.model.language_model.layers[0]
    attn = layer.self_attn
    z = cache["blocks.0.attn.hook_z"]
    assert z.shape[-1] == attn.config.num_attention_heads * attn.head_dim
    with torch.no_grad():
        assert torch.equal(layer.post_attention_layernorm(attn.o_proj(z)), cache["blocks.0.hook_attn_out"])


def test_vision_and_projector_hooks(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    _, cache = vlm.run_with_cache(batch, names_filter=["vision.hook_out", "projector.hook_out"])
    with torch.no_grad():
        features = vlm.hf_model.model.get_image_features(batch.pixel_values, return_dict=True)
    n_images = batch.pixel_values.shape[0]
    assert n_images == 3  # image, blank, swap rows; the text-only row has none
    assert torch.equal(cache["vision.hook_out"], features.last_hidden_state)
    assert torch.equal(cache["projector.hook_out"], features.pooler_output)
    assert cache["projector.hook_out"].shape == (n_images, vlm.hf_model.config.mm_tokens_per_image, vlm.d_model)


def test_cache_positions_store_only_the_selection(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    name = "blocks.1.hook_resid_post"
    _, full = vlm.run_with_cache(batch, names_filter=name)
    _, last = vlm.run_with_cache(batch, names_filter=name, positions="last")
    _, some = vlm.run_with_cache(batch, names_filter=[name], positions=[-3, -1])
    rows = torch.tensor([-1, -2, -3, -4])
    _, per_row = vlm.run_with_cache(batch, names_filter=name, positions=rows)
    assert set(last) == {name}
    assert last[name].shape == (len(batch), vlm.d_model)
    assert torch.equal(last[name], full[name][:, -1])
    assert last[name].untyped_storage().nbytes() == last[name].numel() * last[name].element_size()
    assert torch.equal(some[name], full[name][:, [-3, -1]])
    assert torch.equal(per_row[name], torch.stack([full[name][i, r] for i, r in enumerate(rows.tolist())]))


@pytest.mark.parametrize("positions", ["middle", 1.5, [0, "x"], True, {"a": 1}])
def test_positions_it_cannot_index_with_are_refused_before_the_forward(vlm: HookedVLM, mixed_batch, positions) -> None:
    """The check names what it expected; through `run_with_cache` the suite's runtime type check
    may refuse first, and either way no forward has run."""
    from jaxtyping import TypeCheckError

    with pytest.raises(FlipscopeError, match=r"positions .*: expected an int, 'last', a slice, a list of ints"):
        check_positions(positions)
    _, batch = mixed_batch
    calls = []
    handle = vlm.hf_model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((FlipscopeError, TypeCheckError)):
            vlm.run_with_cache(batch, names_filter="blocks.1.hook_resid_post", positions=positions)
    finally:
        handle.remove()
    assert not calls


def test_editing_hook_moves_margin(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    base = vlm.score(batch)
    tokens = vlm.answer_tokens
    unembed = vlm.hf_model.lm_head.weight.detach()
    direction = unembed[tokens.yes_ids[0]] - unembed[tokens.no_ids[0]]
    alpha = 0.25

    def push(x: torch.Tensor, hook) -> torch.Tensor:
        return x + alpha * direction

    with vlm.hooks(fwd_hooks=[("ln_final.hook_normalized", push)]):
        pushed = vlm.score(batch)
    # The unembedding is linear: the margin moves by alpha * |w_yes - w_no|^2 (one spelling each).
    assert len(tokens.yes_ids) == len(tokens.no_ids) == 1
    torch.testing.assert_close(pushed - base, torch.full_like(base, alpha * float(direction @ direction)))

    def add(x: torch.Tensor, hook) -> torch.Tensor:
        return x + 3.0 * direction

    edited = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_post", add)])
    assert not torch.allclose(edited, vlm(batch))
    assert _no_site_hooks(vlm)


def test_no_hook_survives_an_exception(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch

    def boom(x: torch.Tensor, hook) -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        vlm.run_with_hooks(batch, fwd_hooks=[("blocks.2.hook_mlp_out", boom), ("blocks.0.hook_resid_pre", boom)])
    with pytest.raises(RuntimeError, match="hook failed"), vlm.hooks(fwd_hooks=[("blocks.1.hook_attn_out", boom)]):
        assert not _no_site_hooks(vlm)
        vlm(batch)
    assert _no_site_hooks(vlm)
    assert all(isinstance(hp, _SiteHookPoint) and hp._site_handle is None for hp in vlm.hook_dict.values())


def test_hooks_fire_while_generating(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    seen: list[int] = []
    with vlm.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(x.shape[1]))]):
        texts = vlm.generate(batch, max_new_tokens=3)
    assert len(texts) == len(batch)
    assert seen[0] == batch.input_ids.shape[1] and seen[1:] == [1, 1]


def test_padded_batch_equals_one_by_one(vlm: HookedVLM, mixed_batch) -> None:
    specs, batch = mixed_batch
    assert len({int(n) for n in batch.attention_mask.sum(-1)}) > 1  # really mixed lengths
    batched = vlm.score(batch)
    single = torch.cat([vlm.score(vlm.prompts.build([spec])) for spec in specs])
    # Padding shifts no position (explicit position_ids); differences are float reassociation only.
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_unknown_hook_name_lists_valid_names(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    with pytest.raises(FlipscopeError, match=r"blocks\.17\.hook_resid_post.*blocks\.\{0\.\.3\}\.hook_resid_post"):
        vlm.run_with_hooks(batch, fwd_hooks=[("blocks.17.hook_resid_post", lambda x, hook: x)])
    with pytest.raises(FlipscopeError, match="unknown hook name 'resid'"):
        vlm.run_with_cache(batch, names_filter=["resid"])
    assert _no_site_hooks(vlm)


def test_load_errors_are_one_line(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FlipscopeError, match="no config.json"):
        HookedVLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(FlipscopeError, match="hf auth login"):
        HookedVLM.from_pretrained("google/medgemma-4b-it")
    not_vlm = tmp_path / "encoder"
    not_vlm.mkdir()
    (not_vlm / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(FlipscopeError, match="model_type 'bert' is not a family flipscope runs.*--model-adapter"):
        HookedVLM.from_pretrained(not_vlm)


def test_right_padded_inputs_are_refused(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    kwargs = batch.as_kwargs()
    kwargs["attention_mask"] = kwargs["attention_mask"].flip(-1)
    with pytest.raises(FlipscopeError, match="right-padded"):
        vlm.score(kwargs)


def test_attention_patterns_by_name_at_chosen_queries_and_read_only(vlm: HookedVLM, mixed_batch) -> None:
    _, batch = mixed_batch
    config = vlm.hf_model.model.language_model.config
    names = ["blocks.0.attn.hook_pattern", "blocks.2.attn.hook_pattern"]
    with torch.no_grad():
        _, every = vlm.run_with_cache(batch)
        _, whole = vlm.run_with_cache(batch, names_filter=names)
        last = vlm.cache_activations(batch, names_filter=names[0], positions="last")
        some = vlm.cache_activations(batch, names_filter=names[0], positions=slice(-3, None))
    assert not any(name.endswith("hook_pattern") for name in every)  # "every hook" keeps HF's kernel
    pattern = whole[names[0]]
    assert pattern.shape == (len(batch), config.num_attention_heads, *batch.input_ids.shape[1:] * 2)
    assert torch.equal(last[names[0]], pattern[:, :, -1]) and torch.equal(some[names[0]], pattern[:, :, -3:])
    pad = batch.attention_mask == 0  # left padding: no real query looks at it
    assert pad.any() and float(pattern[:, :, -1][pad[:, None].expand_as(pattern[:, :, -1])].abs().max()) == 0.0
    with vlm.hooks(fwd_hooks=[(names[0], lambda x, hook: None)]):
        with vlm.hooks(fwd_hooks=[(names[1], lambda x, hook: None)]):
            assert config._attn_implementation == "eager"
        assert config._attn_implementation == "eager"  # one pattern hook is still on
    assert config._attn_implementation == "sdpa"
    with pytest.raises(FlipscopeError, match="read only"):
        vlm.run_with_hooks(batch, fwd_hooks=[(names[0], lambda x, hook: x * 0)])
    assert _no_site_hooks(vlm) and config._attn_implementation == "sdpa"
    with pytest.raises(FlipscopeError, match="is an attention pattern .* use blocks.0.attn.hook_z"):
        check_activation_hook(vlm, names[0])  # an SAE's, a pair's or a probe's site
    check_activation_hook(vlm, "blocks.0.attn.hook_z")
