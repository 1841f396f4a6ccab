"""Image-evidence maps: the grid is the soft tokens' own (a planted single-cell signal lands in its patch
on LLaVA and Gemma 3), occlusion of every cell is the blank, integrated gradients add up to the
film's effect, and on the organism occlusion points at the drawn finding more often than a random
map while its deletion curve falls faster than a random order's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flipscope.errors import FlipscopeError
from flipscope.experiments.evidence import (
    FILL,
    Grid,
    attention_map,
    deletion_insertion,
    evidence_share,
    gradient_maps,
    image_grid,
    occlude,
    occlusion_map,
    pointing,
)
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.model.tiny import TinyVLMConfig
from flipscope.model.tiny_families import save_tiny
from flipscope.organism import OrganismConfig, load_organism
from flipscope.organism.data import question, sample_films
from flipscope.organism.train import STREAM_TEST, stream
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def organism():
    vlm, _, card = load_organism()
    return vlm, OrganismConfig.from_dict(card["config"])


def _patch_embeddings(vlm: HookedVLM, module: torch.nn.Module, film: np.ndarray) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        vlm.score(vlm.prompts.build([PromptSpec(question="is there an effusion ?", image=film)]))
    finally:
        handle.remove()
    return seen[0][0]


def test_a_planted_single_cell_signal_lands_in_that_cells_patches_on_llava(tmp_path: Path) -> None:
    cfg = TinyVLMConfig(words=WORDS, seed=2, image_size=56, patch_size=14, mm_tokens_per_image=4)
    llava = HookedVLM.from_pretrained(save_tiny("llava", cfg, tmp_path / "llava"))
    grid = image_grid(llava)
    assert grid == Grid(4, 4)  # one soft token per CLIP patch
    gray = np.full((56, 56), FILL, dtype=np.uint8)
    embeddings = llava.hf_model.model.vision_tower.embeddings
    base = _patch_embeddings(llava, embeddings, gray)
    for cell in (0, 6, 15):
        planted = gray.copy()
        planted[grid.cell_slices(56, 56)[cell]] = 255
        changed = (_patch_embeddings(llava, embeddings, planted) - base).abs().sum(-1)[1:]  # CLS first
        assert torch.nonzero(changed > 1e-6).flatten().tolist() == [cell]


def test_the_gemma_grid_is_the_pooled_tokens_and_occluding_every_cell_is_the_blank(organism) -> None:
    vlm, cfg = organism
    grid = image_grid(vlm)
    assert grid == Grid(4, 4) and grid.n_cells == cfg.mm_tokens_per_image
    film = sample_films(cfg, stream(cfg, STREAM_TEST), 1)[0].pixels
    embeddings = vlm.hf_model.model.vision_tower.embeddings
    base = _patch_embeddings(vlm, embeddings, np.full_like(film, FILL))
    planted = np.full_like(film, FILL)
    planted[grid.cell_slices(64, 64)[6]] = 255  # pooled cell (1, 2): patches rows 2-3, columns 4-5 of 8×8
    changed = (_patch_embeddings(vlm, embeddings, planted) - base).abs().sum(-1)
    assert sorted(torch.nonzero(changed > 1e-6).flatten().tolist()) == [20, 21, 28, 29]
    q = question(cfg, "neutral", 0, "opacity")
    blank = float(vlm.score(vlm.prompts.build([PromptSpec(question=q, condition="blank")]))[0])
    everything = occlude(film, grid, range(grid.n_cells))
    whole = float(vlm.score(vlm.prompts.build([PromptSpec(question=q, image=everything)]))[0])
    assert whole == pytest.approx(blank, abs=1e-4)


def test_integrated_gradients_add_up_to_the_films_effect(organism) -> None:
    vlm, cfg = organism
    film = sample_films(cfg, stream(cfg, STREAM_TEST), 1)[0]
    q = question(cfg, "neutral", 0, next(iter(film.severities)))
    maps = gradient_maps(vlm, q, film.pixels, steps=64)
    assert abs(maps["ig_total"] - maps["delta"]) < 0.02 * abs(maps["delta"]) and abs(maps["delta"]) > 1.0
    assert maps["grad_x_input"].shape == maps["integrated_gradients"].shape == (16,)


def test_occlusion_points_at_the_drawn_finding_and_deletes_faster_than_random(organism) -> None:
    vlm, cfg = organism
    grid = image_grid(vlm)
    rng = np.random.default_rng(0)
    hits, chance, mass, mass_chance, faithful, random_order, maps, masks = [], [], [], [], [], [], [], []
    for film in sample_films(cfg, stream(cfg, STREAM_TEST), 12):
        for finding in film.severities:
            q = question(cfg, "neutral", 0, finding)
            attribution = occlusion_map(vlm, q, film.pixels, grid)
            maps.append(attribution)
            masks.append(film.masks[finding])
            score = pointing(attribution, film.masks[finding], grid)
            hits.append(score["hit"])
            chance.append(score["hit_random"])
            mass.append(score["mass"])
            mass_chance.append(score["mass_random"])
            order = np.argsort(-attribution, kind="stable")
            faithful.append(deletion_insertion(vlm, q, film.pixels, grid, order)["deletion_area"])
            random_order.append(deletion_insertion(vlm, q, film.pixels, grid, rng.permutation(16))["deletion_area"])
    assert len(hits) >= 10
    assert np.mean(hits) > np.mean(chance) + 0.2 and np.mean(mass) > np.mean(mass_chance)
    assert np.mean(faithful) < np.mean(random_order) - 0.1
    # against another case's finding (masks shifted by one), the pointing advantage goes away
    shifted = [pointing(a, m, grid) for a, m in zip(maps, masks[1:] + masks[:1], strict=True)]
    assert np.mean([p["hit"] for p in shifted]) < np.mean([p["hit_random"] for p in shifted]) + 0.15


def test_evidence_share_and_pointing_edges() -> None:
    assert evidence_share(3.0, 0.0) == 1.0 and evidence_share(2.0, 2.0) == 0.0 and evidence_share(0.0, 0.0) == 0.0
    assert evidence_share(1.0, -1.0) == pytest.approx(2 / 3)
    grid, mask = Grid(2, 2), np.zeros((4, 4), dtype=bool)
    mask[0:2, 2:4] = True  # cell 1 exactly
    assert pointing(np.array([0.0, 5.0, 1.0, 0.0]), mask, grid) == {
        "hit": 1.0, "mass": 5 / 6, "hit_random": 0.25, "mass_random": 0.25}  # fmt: skip
    assert pointing(np.array([-1.0, -2.0, -3.0, -4.0]), mask, grid)["mass"] == 0.0


def test_maps_run_on_llava_and_integrated_gradients_add_up_there(tmp_path: Path) -> None:
    cfg = TinyVLMConfig(words=WORDS, seed=2, image_size=56, patch_size=14, mm_tokens_per_image=4)
    llava = HookedVLM.from_pretrained(save_tiny("llava", cfg, tmp_path / "llava"))
    grid = image_grid(llava)
    film = np.random.default_rng(1).integers(0, 256, size=(56, 56), dtype=np.uint8)
    q = "is there an effusion ?"
    occlusion = occlusion_map(llava, q, film, grid, batch_size=5)  # several batches
    maps = gradient_maps(llava, q, film, steps=64)
    attention = attention_map(llava, q, film)
    assert occlusion.shape == maps["integrated_gradients"].shape == attention.shape == (16,)
    assert np.isfinite(occlusion).all() and (attention >= 0).all() and 0 < attention.sum() <= 1 + 1e-6
    assert llava.hf_model.config._attn_implementation != "eager"  # put back as it was
    assert abs(maps["delta"]) > 1e-3 and abs(maps["ig_total"] - maps["delta"]) < 0.05 * abs(maps["delta"])


def test_the_evidence_command_scores_every_method_against_the_random_baselines(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flipscope.cli import app

    result = CliRunner().invoke(app, ["organism", "evidence", "--films", "3", "--out", str(tmp_path / "e"), "--no-png"])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "e" / "evidence.json").read_text())
    assert (tmp_path / "e" / "overlays.html").is_file()
    assert set(found["methods"]) == {"occlusion", "grad_x_input", "integrated_gradients", "attention", "random"}
    assert found["methods"]["random"]["deletion_area"]["n"] == 4 * found["methods"]["occlusion"]["hit"]["n"]
    assert (
        set(found["share"]["by_family"]) == {"neutral", "leading", "formal"} and found["share"]["original"]["n"] == 12
    )
    assert "pointing" in result.output and "nan" not in result.output


def test_flip_evidence_maps_both_wordings_of_each_case_and_draws_them(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flipscope.cli import app

    bank = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
    args = ["evidence", "--flipbank", str(bank), "--max-cases", "3", "--pictures", "2", "--out", str(tmp_path / "e"),
            "--no-png"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "e" / "evidence.json").read_text())
    assert [c["flip"] for c in found["cases"]] == [True] * 3 + [False] * 3
    assert all(c["grid"] == {"rows": 4, "cols": 4, "box": [0.0, 0.0, 1.0, 1.0]} for c in found["cases"])
    case = found["cases"][0]
    assert len(case["map_original"]) == len(case["map_paraphrase"]) == 16 and -1 <= case["cosine"] <= 1
    assert (case["margin_original"] > 0) != (case["margin_paraphrase"] > 0)  # a flip: the answers differ
    assert 0 <= case["share_original"] <= 1 and found["summary"]["flips"]["n"] == 3
    assert (tmp_path / "e" / "overlays.html").is_file() and "fewer than" not in result.output
    assert "(from only 3 cases)" in result.output and "nan" not in result.output


def test_the_share_read_from_a_runs_margins_is_the_share_the_model_gives(organism, tmp_path: Path) -> None:
    from flipscope.data.questions import load_questions
    from flipscope.experiments.evaluation import EvalConfig, run_sweep
    from flipscope.experiments.evidence_pairs import run_shares
    from flipscope.organism.evidence_study import share_table
    from flipscope.organism.questions import export_questions

    vlm, cfg = organism
    questions = load_questions(export_questions(cfg, tmp_path / "q", n_films=3))
    store = tmp_path / "run" / "results.jsonl"
    run_sweep(vlm, questions, EvalConfig(conditions=("image", "blank")), store, progress=False)
    from_run = run_shares(store)
    direct = share_table(vlm, cfg, sample_films(cfg, stream(cfg, STREAM_TEST), 3))
    for family in ("leading", "formal"):
        assert from_run["by_family"][family]["value"] == pytest.approx(direct["by_family"][family]["value"], abs=1e-4)
    assert from_run["by_family"]["original"]["value"] == pytest.approx(direct["original"]["value"], abs=1e-4)
    _evidence_cli_reads_the_run(store, from_run, tmp_path / "cli")
    image_only = tmp_path / "image" / "results.jsonl"
    run_sweep(vlm, questions, EvalConfig(conditions=("image",)), image_only, progress=False)
    with pytest.raises(FlipscopeError, match="--conditions image,blank"):
        run_shares(image_only)


def _evidence_cli_reads_the_run(store: Path, from_run: dict, out: Path) -> None:
    """`flipscope evidence --run` writes and prints what `run_shares` finds; both inputs at once are refused."""
    import json

    from typer.testing import CliRunner

    from flipscope.cli import app

    result = CliRunner().invoke(app, ["evidence", "--run", str(store.parent), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "evidence.json").read_text()) == json.loads(json.dumps(from_run))
    assert "image-evidence share, leading:" in result.output and "nan" not in result.output
    assert "flipping paraphrase minus its original:" in result.output
    both = CliRunner().invoke(app, ["evidence", "--run", str(store), "--flipbank", str(store), "--out", str(out)])
    assert both.exit_code == 2 and "exactly one of --flipbank and --run" in both.output


def test_a_bank_without_controls_reports_none_for_them_never_nan(organism) -> None:
    import json

    from flipscope.data.flipbank import load_flipbank
    from flipscope.experiments.evidence_pairs import flip_evidence

    bank = load_flipbank(Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json")
    found = flip_evidence(organism[0], {**bank, "controls": []}, max_cases=1, progress=False)
    empty = {"value": None, "low": None, "high": None, "n": 0}
    assert found["summary"]["controls"] == {"n": 0, "cosine": empty, "share_change": empty}
    json.dumps(found, allow_nan=False)
