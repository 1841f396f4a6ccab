"""Every model family on a tiny random checkpoint written here: the hooked model is the plain HF
model (bit-identical logits, with and without identity hooks on every hook point), `resid_post`
is HF's hidden state, padded batches equal prompts alone, and the hook names list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.model import Edit, HookedVLM, PromptSpec
from flipscope.model.families import image_token_mask
from flipscope.model.hook_names import attn_pattern
from flipscope.model.hook_points import is_pattern_hook
from flipscope.model.tiny import TinyVLMConfig, save_tiny_vlm
from flipscope.model.tiny_families import save_tiny
from tests.conftest import WORDS

pytestmark = pytest.mark.costly(23)

FAMILIES = ("gemma3", "gemma3_text", "llava", "qwen2_5_vl", "generic")
CONTEXT = "the film shows a pleural effusion ."
OTHER = "the lungs are clear ."


def _save(family: str, root: Path) -> Path:
    cfg = TinyVLMConfig(words=WORDS, seed=2, image_size=56, patch_size=14, mm_tokens_per_image=4)
    if family == "gemma3":
        return save_tiny_vlm(TinyVLMConfig(words=WORDS, seed=2), root / family)
    return save_tiny("llava" if family == "generic" else family, cfg, root / family)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: _save(family, root) for family in FAMILIES}


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path]) -> dict[str, HookedVLM]:
    return {
        family: HookedVLM.from_pretrained(path, family="generic" if family == "generic" else None)
        for family, path in checkpoints.items()
    }


def _film(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    return Image.fromarray(pixels)


def _specs(vlm: HookedVLM) -> list[PromptSpec]:
    """Prompts of different lengths under every condition the family supports."""
    if vlm.family.evidence == "text":
        return [
            PromptSpec(question="is there an effusion ?", condition="context", context=CONTEXT),
            PromptSpec(question="do you see any pleural effusion in this film ?", condition="none"),
            PromptSpec(question="are the lungs clear ?", condition="swap", swap_context=OTHER),
        ]
    return [
        PromptSpec(question="is there an effusion ?", condition="image", image=_film(1)),
        PromptSpec(question="do you see any pleural effusion in this film ?", condition="blank"),
        PromptSpec(question="are the lungs clear ?", condition="none"),
        PromptSpec(question="is there any opacity ?", condition="swap", swap_image=_film(2, (64, 30))),
    ]


def _plain(vlm: HookedVLM, spec: PromptSpec) -> dict[str, torch.Tensor]:
    """The processor's own output for one prompt, as a user feeds the HF model."""
    builder = vlm.prompts
    return dict(
        vlm.processor.apply_chat_template(
            builder.messages(spec, builder.image_for(spec)),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_logits_are_the_plain_forward_with_and_without_identity_hooks(models, family: str) -> None:
    vlm = models[family]
    for spec in _specs(vlm):
        with torch.no_grad():
            plain = vlm.hf_model(**_plain(vlm, spec)).logits
            inputs = vlm.prompts.build([spec])
            hooked = vlm(inputs)
            identity = vlm.run_with_hooks(
                inputs, fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: x)]
            )
        assert torch.equal(hooked, plain), (family, spec.condition)
        assert torch.equal(identity, plain), (family, spec.condition)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_patterns_are_hf_eager_weights_and_leave_the_kernel_as_it_was(models, family: str) -> None:
    vlm = models[family]
    config = vlm.hf_model.get_decoder().config
    kernel = config._attn_implementation
    names = [attn_pattern(layer) for layer in range(vlm.n_layers)]
    inputs = vlm.prompts.build(_specs(vlm)[:1])
    with torch.no_grad():
        logits, cache = vlm.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_pattern"))
        assert config._attn_implementation == kernel  # back where it was
        config._attn_implementation = "eager"
        try:
            plain = vlm.hf_model(**vlm.family.forward_kwargs(vlm.hf_model, inputs.as_kwargs()), output_attentions=True)
        finally:
            config._attn_implementation = kernel
    assert sorted(cache) == sorted(names)
    assert torch.equal(logits, plain.logits), family  # HF's own eager forward
    for layer, name in enumerate(names):
        assert torch.equal(cache[name], plain.attentions[layer]), (family, layer)
        torch.testing.assert_close(cache[name].sum(-1), torch.ones(cache[name].shape[:-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, -1], vlm(inputs)[:, -1], rtol=0, atol=1e-4)  # sdpa agrees


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_post_is_the_hf_hidden_state(models, family: str) -> None:
    vlm = models[family]
    spec = _specs(vlm)[0]
    with torch.no_grad():
        hidden = vlm.hf_model(**_plain(vlm, spec), output_hidden_states=True).hidden_states
        _, cache = vlm.run_with_cache(vlm.prompts.build([spec]), names_filter=lambda n: "resid" in n)
    for layer in range(vlm.n_layers - 1):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1]), (family, layer)
        assert torch.equal(cache[f"blocks.{layer + 1}.hook_resid_pre"], hidden[layer + 1]), (family, layer)
    names = set(vlm.hook_dict)
    assert {f"blocks.{vlm.n_layers - 1}.hook_{p}" for p in ("resid_pre", "attn_out", "mlp_out", "resid_post")} <= names
    assert "ln_final.hook_normalized" in names
    if vlm.family.evidence == "image" and family != "generic":
        assert "projector.hook_out" in names and "vision.blocks.0.hook_resid_post" in names


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3_text"])
def test_the_prompt_builders_image_token_is_the_soft_token_the_model_fills(models, family: str) -> None:
    vlm = models[family]
    spec = _specs(vlm)[0]
    inputs = vlm.prompts.build([spec])
    soft = image_token_mask(vlm.hf_model, inputs.input_ids)
    assert int(soft.sum()) > 1, family  # the image expands to several soft tokens
    assert torch.equal(inputs.input_ids == vlm.prompts.image_token_id, soft), family
    assert torch.equal(inputs.token_type_ids.bool(), soft), family  # the mask the builder derives


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_out_sum_to_the_residual_update(models, family: str) -> None:
    vlm = models[family]
    _, cache = vlm.run_with_cache(vlm.prompts.build(_specs(vlm)[:1]))
    for layer in range(vlm.n_layers - 1):
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        update = cache[f"blocks.{layer}.hook_attn_out"] + cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(pre + update, post, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_mixed_batch_equals_one_by_one(models, family: str) -> None:
    vlm = models[family]
    specs = _specs(vlm)
    batched = vlm.score(vlm.prompts.build(specs))
    single = torch.cat([vlm.score(vlm.prompts.build([spec])) for spec in specs])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert bool(torch.isfinite(batched).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_activations_is_the_cache_of_a_forward_that_stops_once_it_holds_it(models, family: str) -> None:
    """A cache of early hooks (vision, the projector, layer 0) equals `run_with_cache`'s, and no
    later hook fires; an edited sibling's edit before the hook applies; a hook that does not fire
    (the projector without a film) runs the forward to its end; no hook is left on after the stop."""
    vlm = models[family]
    inputs = vlm.prompts.build(_specs(vlm))
    selections = [["blocks.0.hook_resid_pre"], ["blocks.0.hook_attn_out", "blocks.0.hook_resid_post"]]
    if "projector.hook_out" in vlm.hook_dict:
        selections.append(["projector.hook_out"])
    if "vision.blocks.0.hook_resid_post" in vlm.hook_dict:
        selections.append(["vision.blocks.0.hook_resid_post", "projector.hook_out"])
    fired: list[str] = []
    watch = [
        (n, lambda x, hook: fired.append(hook.name)) for n in ("blocks.0.hook_mlp_out", "ln_final.hook_normalized")
    ]
    for names in selections:
        fired.clear()
        with torch.no_grad():
            _, full = vlm.run_with_cache(inputs, names_filter=names, positions="last")
            with vlm.hooks(fwd_hooks=watch):
                stopped = vlm.cache_activations(inputs, names_filter=names, positions="last")
        assert sorted(stopped) == sorted(full) == sorted(names), (family, names)
        assert all(torch.equal(stopped[n], full[n]) for n in names), (family, names)
        assert fired == (["blocks.0.hook_mlp_out"] if "blocks.0.hook_resid_post" in names else []), (family, names)
    push = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0))
    edited = vlm.edited(Edit("blocks.0.hook_attn_out", lambda x, hook: x + push))  # an edit the stop passes through
    site = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, full = edited.run_with_cache(inputs, names_filter=site)
        stopped, plain = (
            edited.cache_activations(inputs, names_filter=site),
            vlm.cache_activations(inputs, names_filter=site),
        )
    assert torch.equal(stopped[site], full[site]) and not torch.equal(stopped[site], plain[site])
    assert all(not point.fwd_hooks for model in (vlm, edited) for point in model.hook_dict.values())
    if "projector.hook_out" in vlm.hook_dict:
        fired.clear()
        with torch.no_grad(), vlm.hooks(fwd_hooks=watch):
            unseen = vlm.cache_activations(vlm.prompts.build([PromptSpec(question="is it ?", condition="none")]),
                                           names_filter="projector.hook_out")  # fmt: skip
        assert unseen == {} and fired == ["blocks.0.hook_mlp_out", "ln_final.hook_normalized"]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edit_on_a_middle_layer_moves_the_margin(models, family: str) -> None:
    vlm = models[family]
    inputs = vlm.prompts.build(_specs(vlm)[:2])
    before = vlm.score(inputs)
    direction = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0)) * 5
    with vlm.hooks(fwd_hooks=[(f"blocks.{vlm.n_layers // 2}.hook_resid_post", lambda x, hook: x + direction)]):
        after = vlm.score(inputs)
    assert float((after - before).abs().min()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_in_the_question_on_suffix_runs_equal_whole_prompts(models, family: str) -> None:
    """`batch_runs` (the trace's and the pairs' forwards): where the family's KV-cache paths are
    sound, the prompts before the questions run once for each distinct film and an edit at the
    questions moves the margins, and the last position's activations are, as on whole prompts;
    elsewhere every forward is a whole prompt."""
    from flipscope.model.suffix import FullRuns, SuffixRuns, batch_runs

    vlm = models[family]
    condition = "none" if vlm.family.evidence == "text" else "image"
    questions = ("is there an effusion ?", "do you see any pleural effusion in this film ?", "are the lungs clear ?",
                 "is a pleural effusion present ?")  # fmt: skip
    specs = [PromptSpec(question=q, condition=condition, image=_film(k % 2)) for k, q in enumerate(questions)]
    inputs = vlm.prompts.build(specs)
    question = vlm.prompts.question_mask(specs, inputs)
    runs = batch_runs(vlm, inputs, question)
    assert type(runs) is (FullRuns if vlm.fast_path_off else SuffixRuns)
    if isinstance(runs, SuffixRuns):  # two films: two prefix rows, or one where no film is shown
        assert runs.cache.layers[0].keys.shape[0] == (1 if inputs.pixel_values is None else 2)
    window = getattr(vlm.hf_model.config.get_text_config(), "sliding_window", None)
    assert family != "gemma3" or inputs.input_ids.shape[1] > window  # the prefix's cache outgrows the window
    hook = f"blocks.{vlm.n_layers // 2}.hook_resid_pre"
    push = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(0)) * 5

    def edit(mask: torch.Tensor):
        return [(hook, lambda x, hook: x + mask[..., None].to(x) * push)]

    whole = FullRuns(vlm, inputs)
    with torch.no_grad():
        before, after = whole.margins(), whole.margins(edit(question))
    assert float((after - before).abs().min()) > 1e-3
    torch.testing.assert_close(runs.margins(), before, rtol=0, atol=1e-4)
    torch.testing.assert_close(runs.margins(edit(runs.to_run(question))), after, rtol=0, atol=1e-4)
    (margin, cache), (_, whole_cache) = runs.run_with_cache([hook], last=True), whole.run_with_cache([hook], last=True)
    assert cache[hook].shape == (len(specs), vlm.d_model)
    torch.testing.assert_close(margin, before, rtol=0, atol=1e-4)
    torch.testing.assert_close(cache[hook], whole_cache[hook], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "gemma3_text"])
def test_every_path_reads_the_margin_the_forward_gives_under_a_logit_cap(models, family: str) -> None:
    """Gemma 3's causal LM soft-caps its logits when its config says so and the VLM class does
    not: the KV-cache paths and the logit lens, which unembed hidden states themselves, follow
    the forward either way."""
    from flipscope.experiments.lens import lens_margins
    from flipscope.model.hook_names import resid_post

    vlm = models[family]
    text = vlm.hf_model.config.get_text_config()
    specs = [PromptSpec(question=q, condition="none") for q in ("is there an effusion ?", "are the lungs clear ?")]
    inputs = vlm.prompts.build(specs)
    uncapped = vlm.score(inputs)
    with torch.no_grad():
        text.final_logit_softcapping = float(vlm(inputs, logits_to_keep=1).abs().max()) / 2  # well into tanh's bend
    try:
        forward = vlm.score(inputs)
        assert torch.equal(forward, uncapped) == (family == "gemma3")
        hidden = vlm.hf_hidden(**inputs.as_kwargs(), use_cache=False).last_hidden_state[:, -1]
        torch.testing.assert_close(vlm.answer_margin(hidden), forward, rtol=0, atol=1e-5)
        torch.testing.assert_close(vlm.score_shared_prefix(specs), forward, rtol=0, atol=1e-4)
        last = resid_post(vlm.n_layers - 1)
        _, cache = vlm.run_with_cache(inputs, names_filter=last, positions="last")
        torch.testing.assert_close(lens_margins(vlm, cache[last]), forward, rtol=0, atol=1e-4)
    finally:
        text.final_logit_softcapping = None


@pytest.mark.parametrize("family", FAMILIES)
def test_flipscope_hooks_lists_the_family_names(checkpoints, models, family: str) -> None:
    args = ["hooks", str(checkpoints[family])] + (["--family", "generic"] if family == "generic" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.split() == list(models[family].hook_dict)


def test_qwen_blank_has_the_token_layout_of_its_pixel_budget(models) -> None:
    vlm = models["qwen2_5_vl"]
    image = vlm.prompts.build([PromptSpec(question="is there an effusion ?", condition="blank")])
    assert image.extra["image_grid_thw"].shape == (1, 3)
    n_image_tokens = int(image.token_type_ids.sum())
    assert n_image_tokens == int(image.extra["image_grid_thw"].prod()) // 4


def test_flipscope_families_lists_every_family_with_its_fast_path() -> None:
    result = CliRunner().invoke(app, ["families"])
    assert result.exit_code == 0, result.output
    for family in FAMILIES:
        assert f"\n{family}: " in "\n" + result.output
    assert "fast path off: Qwen2.5-VL's multimodal rotary positions" in result.output
    assert "MedGemma 27B text" in result.output


def test_the_family_benchmark_runs_and_records_its_ratios(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    out = tmp_path / "families.json"
    command = [sys.executable, str(root / "benchmarks" / "bench_families.py"), "--families", "gemma3_text,qwen2_5_vl"]
    done = subprocess.run([*command, "--rounds", "1", "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())["families"]
    assert record["gemma3_text"]["fast_vs_naive"] > 0 and record["qwen2_5_vl"]["fast_vs_naive"] is None
    assert record["qwen2_5_vl"]["fast_path_off"] and all(r["hooked_vs_hf"] > 0 for r in record.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_head_trace_slices_every_familys_heads(models, family: str) -> None:
    """All of layer 0's heads restored at the last position are layer 1's input restored there, in
    every family (grouped key/value heads, whole prompts where the suffix path is off), and each
    head's attention from the last position is whole over the four parts of the prompt."""
    from flipscope.experiments.heads import LOOKS, trace_heads
    from flipscope.experiments.pairs import case_spec
    from flipscope.experiments.upstream import GROUPS, trace_framing

    vlm = models[family]
    pairs = [("is there an effusion ?", "do you see any pleural effusion in this film ?"),
             ("are the lungs clear ?", "is a pleural effusion present in this film ?")]  # fmt: skip
    flips = []
    for k, (original, paraphrase) in enumerate(pairs):
        evidence = {"image": None, "context": CONTEXT} if vlm.family.evidence == "text" else {"image": _film(k)}
        case = {"id": f"c{k}", "original": original, "paraphrase": paraphrase, **evidence}
        with torch.no_grad():
            case["original_margin"] = float(vlm.score(vlm.prompts.build([case_spec(case, original)]))[0])
        flips.append(case)
    last_layer = vlm.n_layers - 1  # global attention in every family (Gemma's first layers slide)
    heads = trace_heads(vlm, {"flips": flips}, layers=[0, last_layer], progress=False)
    layer_1 = trace_framing(vlm, {"flips": flips}, layers=[1], progress=False)
    assert heads.case_ids and heads.case_ids == layer_1.case_ids
    last = layer_1.restored[:, 0, GROUPS.index("last position")]
    np.testing.assert_allclose(heads.whole[:, 0], last, atol=1e-4)
    np.testing.assert_allclose(heads.looks.sum(-1), 1.0, atol=1e-5)
    assert heads.looks.shape[2] == vlm.hf_model.config.get_text_config().num_attention_heads
    on_image = heads.looks[..., LOOKS.index("image")]
    if vlm.family.evidence == "image":
        assert (on_image[:, 1] > 0).all() and (on_image >= 0).all()
    else:
        assert (on_image == 0).all()
