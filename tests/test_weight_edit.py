"""A direction folded out of the writers' weights equals the run-time ablation on two families (Gemma 3's
post-norms and LLaVA's Llama decoder), writes nothing along the direction, saves and loads as an ordinary
checkpoint, and its stores never resume into the base model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipscope.data.questions import load_questions
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.interventions.weight_edit import ablate_writers, fold_writers, writer_sites
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.model.tiny import TinyVLMConfig
from flipscope.model.tiny_families import save_tiny
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions
from tests.conftest import WORDS

QUESTIONS = (
    "Is the suspected opacity there?",
    "Is there a pneumothorax?",
    "Do you see the suspected pleural effusion on this film?",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[HookedVLM, list[PromptSpec]]]:
    organism = HookedVLM.from_pretrained(default_organism_dir())
    film = np.asarray(Image.open(Path(__file__).parents[1] / "flipbank" / "organism" / "images" / "film0001.png"))
    cfg = TinyVLMConfig(words=WORDS, seed=2, image_size=56, patch_size=14, mm_tokens_per_image=4)
    llava = HookedVLM.from_pretrained(save_tiny("llava", cfg, tmp_path_factory.mktemp("llava") / "llava"))
    llava_film = np.random.default_rng(0).integers(0, 256, size=(40, 48), dtype=np.uint8)
    words = ["is there an effusion ?", "do you see any pleural effusion in this film ?", "are the lungs clear ?"]
    return {
        "gemma3": (organism, [PromptSpec(question=q, image=film) for q in QUESTIONS]),
        "llava": (llava, [PromptSpec(question=q, image=llava_film) for q in words]),
    }


def _direction(vlm: HookedVLM, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(vlm.d_model)).float()


@pytest.mark.parametrize("k", [1, 3], ids=["one-direction", "three-rows"])
@pytest.mark.parametrize("family", ["gemma3", "llava"])
def test_the_folded_weights_equal_the_runtime_ablation_and_write_nothing_along_the_direction(models, family, k) -> None:
    vlm, specs = models[family]
    direction = _direction(vlm) if k == 1 else torch.stack([_direction(vlm, seed) for seed in range(k)])
    layers, components = [0, 1], ["attn", "mlp"]
    folded = fold_writers(vlm, direction, layers, components)
    runtime = ablate_writers(vlm, direction, layers, components)
    batch = vlm.prompts.build(specs)
    base, hooked, weights = vlm.score(batch), runtime.score(batch), folded.score(batch)
    assert (hooked - base).abs().max() > 1e-3  # the edit moves the margins
    torch.testing.assert_close(weights, hooked, atol=1e-4, rtol=0)
    rows = direction.reshape(k, -1)
    r = rows / rows.norm(dim=-1, keepdim=True)
    names = [f"blocks.{layer}.hook_{c}_out" for layer in layers for c in components]
    _, cache = folded.run_with_cache(batch, names_filter=names)
    for name in names:  # every direction of the stack: nothing written along it
        assert (cache[name].float() @ r.T).abs().max() < 1e-4 * cache[name].float().norm(dim=-1).max()
    _, before = vlm.run_with_cache(batch, names_filter=names)
    assert max(float((before[n].float() @ r.T).abs().max()) for n in names) > 1e-2
    untouched = dict(vlm.hf_model.named_parameters())  # the base model is left as it was
    assert all(
        torch.equal(p, untouched[n]) for n, p in HookedVLM.from_pretrained(vlm.name_or_path).hf_model.named_parameters()
    )


def test_gemma_writers_are_edited_before_the_post_norm_and_llava_writers_at_their_outputs(models) -> None:
    gemma, _ = models["gemma3"]
    llava, _ = models["llava"]
    sites = writer_sites(gemma, _direction(gemma), [0], ["attn", "mlp"])
    assert [s.hook for s in sites] == ["blocks.0.ln1_post.hook_in", "blocks.0.ln2_post.hook_in"]
    assert [s.hook for s in writer_sites(llava, _direction(llava), [1], ["mlp"])] == ["blocks.1.hook_mlp_out"]
    twice = torch.stack([_direction(gemma), 2 * _direction(gemma)])
    for bad in ({"layers": [99]}, {"components": ["embed"]}, {"direction": torch.zeros(gemma.d_model)},
                {"direction": twice}, {"direction": torch.ones(gemma.d_model + 1)}):  # fmt: skip
        args = {"direction": _direction(gemma), "layers": [0], "components": ["attn"], **bad}
        with pytest.raises(FlipscopeError):
            fold_writers(gemma, **args)


def test_a_folded_checkpoint_loads_as_itself_and_its_store_never_resumes_into_the_base(models, tmp_path: Path) -> None:
    vlm, specs = models["gemma3"]
    folded = fold_writers(vlm, _direction(vlm, 1), [0], ["attn"], name="framing")
    folded.hf_model.save_pretrained(tmp_path / "cured")
    folded.processor.save_pretrained(tmp_path / "cured")
    loaded = HookedVLM.from_pretrained(tmp_path / "cured")
    assert not loaded.edits and loaded.adapter is None
    batch = vlm.prompts.build(specs)
    torch.testing.assert_close(loaded.score(batch), folded.score(batch), atol=1e-6, rtol=0)
    edit = loaded.identity()["weight_edit"]
    assert edit == [{"name": "framing", "sha256": edit[0]["sha256"], "layers": [0], "components": ["attn"]}]
    assert "weight_edit" not in vlm.identity()
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    questions = load_questions(export_questions(cfg, tmp_path / "q", n_films=1))
    store = tmp_path / "base" / "results.jsonl"
    run_sweep(vlm, questions, EvalConfig(), store, progress=False)
    with pytest.raises(FlipscopeError, match=r"different run \(differs in model\."):
        run_sweep(loaded, questions, EvalConfig(), store, progress=False)
