# ruff: noqa: E501
"""LoRA fine-tunes and a second site: deterministic adapters that load merged and agree with peft's own
forward, the shipped adapters as configured, and a second site that films the same patients differently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipscope.data.questions import load_questions
from flipscope.errors import FlipscopeError
from flipscope.model.hooked import HookedVLM
from flipscope.model.prompts import PromptSpec
from flipscope.organism import OrganismConfig, default_organism_dir, load_organism
from flipscope.organism.finetune import FINETUNES, FinetuneConfig, default_adapters_dir, finetune
from flipscope.organism.questions import export_questions

FILM = Path(__file__).parents[1] / "flipbank" / "organism" / "images" / "film0001.png"


@pytest.fixture(scope="module")
def organism():
    return load_organism()


def _weights(vlm: HookedVLM) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in vlm.hf_model.parameters())).hexdigest()


def test_a_finetune_is_deterministic_leaves_the_model_and_loads_merged(organism, tmp_path: Path) -> None:
    from peft import PeftModel

    vlm, _, card = organism
    cfg = OrganismConfig.from_dict(card["config"])
    before = _weights(vlm)
    ft = FinetuneConfig(name="tiny", rank=2, alpha=4.0, steps=4, batch_size=16)
    logs = [finetune(vlm, cfg, ft, tmp_path / name) for name in ("a", "b")]
    assert _weights(vlm) == before  # the organism itself is untouched
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()
    assert logs[0] == logs[1] and logs[0]["trainable_params"] > 0
    assert "flipscope-organism" in (tmp_path / "a" / "adapter_config.json").read_text()  # no local path
    assert not (tmp_path / "a" / "README.md").exists()

    tuned = HookedVLM.from_pretrained(default_organism_dir(), adapter=tmp_path / "a")
    assert tuned.identity()["adapter"] == "a" and tuned.identity()["fingerprint"] != vlm.identity()["fingerprint"]
    inputs = vlm.prompts.build([PromptSpec(question="Is there an effusion?", image=FILM)])
    reference = PeftModel.from_pretrained(HookedVLM.from_pretrained(default_organism_dir()).hf_model, tmp_path / "a")
    with torch.no_grad():
        unmerged = reference(**inputs.as_kwargs(), logits_to_keep=1).logits[:, -1]
        merged = tuned.hf_model(**inputs.as_kwargs(), logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    peft_merged = PeftModel.from_pretrained(HookedVLM.from_pretrained(default_organism_dir()).hf_model, tmp_path / "a")
    peft_merged = HookedVLM(peft_merged.merge_and_unload().eval(), tuned.processor)
    torch.testing.assert_close(tuned.score(inputs), peft_merged.score(inputs), atol=1e-5, rtol=0)
    assert not torch.allclose(merged, vlm.hf_model(**inputs.as_kwargs(), logits_to_keep=1).logits[:, -1])


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FlipscopeError, match="has no adapter_config.json"):
        HookedVLM.from_pretrained(default_organism_dir(), adapter=tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FlipscopeError, match="no adapter_model.safetensors"):
        HookedVLM.from_pretrained(default_organism_dir(), adapter=tmp_path)


@pytest.mark.parametrize("ft", FINETUNES, ids=[ft.name for ft in FINETUNES])
def test_the_shipped_adapters_are_what_their_configurations_say(ft: FinetuneConfig) -> None:
    folder = default_adapters_dir() / ft.name
    log = json.loads((folder / "finetune.json").read_text())
    assert log["config"] == ft.to_dict() and "objective" not in log["config"]  # logs from before the cures' fields
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert size == log["adapter_bytes"] and size < 600_000
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == ft.rank


@pytest.mark.slow
def test_a_shipped_adapter_is_rebuilt_on_any_machine(organism, tmp_path: Path) -> None:
    """Rebuilt here, the shipped adapter's recipe gives the shipped model: the same answers on 400
    prompts, margins within 0.1 logits and weights within 2e-3. Not its bytes: the adapters were
    trained before flipscope pinned its kernels, on kernels that neither this CPU's own nor the
    portable ones reproduce here, and training carries the rounding through every step (measured on an
    AVX512 AMD EPYC: weights 2.9e-4 apart on its own kernels and 2.3e-4 on the portable ones). A
    rebuild on one machine is bitwise (`test_a_finetune_is_deterministic_leaves_the_model_and_loads_merged`)."""
    from safetensors.torch import load_file

    vlm, _, card = organism
    cfg, ft = OrganismConfig.from_dict(card["config"]), FINETUNES[0]
    finetune(vlm, cfg, ft, tmp_path / ft.name)
    shipped = default_adapters_dir() / ft.name
    rebuilt, recorded = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / ft.name, shipped))
    assert rebuilt.keys() == recorded.keys()
    assert max(float((rebuilt[k] - recorded[k]).abs().max()) for k in recorded) < 2e-3
    questions = load_questions(export_questions(cfg, tmp_path / "qs", n_films=10))
    specs = [PromptSpec(question=p, image=q.image) for q in questions for p in (q.question, *q.paraphrases)]

    def margins(adapter: Path) -> np.ndarray:
        model = HookedVLM.from_pretrained(default_organism_dir(), adapter=adapter)
        return torch.cat(
            [model.score(model.prompts.build(specs[i : i + 32])) for i in range(0, len(specs), 32)]
        ).numpy()

    ours, theirs = margins(tmp_path / ft.name), margins(shipped)
    assert len(specs) == 400 and np.abs(ours - theirs).max() < 0.1
    assert np.array_equal(ours > 0, theirs > 0)


def test_the_second_site_films_the_same_patients_differently(organism, tmp_path: Path) -> None:
    cfg = OrganismConfig.from_dict(organism[2]["config"])
    first = export_questions(cfg, tmp_path / "site1", n_films=3)
    second = export_questions(cfg, tmp_path / "site2", n_films=3, site="site2")
    shipped = Path(__file__).parents[1] / "flipbank" / "organism" / "images" / "film0000.png"
    assert (tmp_path / "site1" / "images" / "film0000.png").read_bytes() == shipped.read_bytes()
    rows1 = [json.loads(line) for line in first.read_text().splitlines()]
    rows2 = [json.loads(line) for line in second.read_text().splitlines()]
    assert [r["id"] for r in rows2] == [f"site2-{r['id']}" for r in rows1]
    assert [r["answer"] for r in rows2] == [r["answer"] for r in rows1]  # the same patients
    a = np.asarray(Image.open(tmp_path / "site1" / "images" / "film0000.png"), dtype=np.float64)
    b = np.asarray(Image.open(tmp_path / "site2" / "images" / "film0000.png"), dtype=np.float64)
    assert a.shape == b.shape and b.mean() > a.mean() + 5  # brighter exposure
    with pytest.raises(FlipscopeError, match="site 'site3' is unknown"):
        export_questions(cfg, tmp_path / "site3", n_films=1, site="site3")


def test_the_study_compares_five_configurations_on_two_sites(tmp_path: Path) -> None:
    from flipscope.reporting.study import CONFIGURATIONS, run_study

    found = run_study(tmp_path, n_films=4, png=False, echo=lambda _: None)
    assert found["names"] == [f"{c}-{s}" for c in CONFIGURATIONS for s in ("site1", "site2")]
    assert len(found["names"]) == 10 and found["questions"] == "own" and found["n_shared_questions"] == 0
    runs = found["runs"]
    assert runs["lora-r4-site1"]["flip_rate"]["value"] < runs["organism-site1"]["flip_rate"]["value"]
    assert (
        runs["lora-r4-site1"]["quadrants"]["Dangerous"]["share"]["value"]
        > runs["organism-site1"]["quadrants"]["Dangerous"]["share"]["value"]
    )
    assert "pearson" in found["correlation"] and all("screening" in runs[n] for n in found["names"])
    assert (tmp_path / "compare.html").is_file() and (tmp_path / "work" / "lora-r16-site2" / "results.jsonl").is_file()


def test_every_model_command_takes_an_adapter_and_a_base_bank_is_not_the_adapted_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flipscope.cli import app

    adapter = str(default_adapters_dir() / "lora-r4")
    listed = CliRunner().invoke(app, ["hooks", str(default_organism_dir()), "--adapter", adapter])
    assert listed.exit_code == 0 and "blocks.2.hook_resid_post" in listed.output
    bank = str(Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json")
    for command in (
        ["discover", "--out", str(tmp_path / "f.json")],
        ["patch", "--features", "38", "--out", str(tmp_path / "p")],
        ["trace", "--out", str(tmp_path / "t.json")],
    ):
        result = CliRunner().invoke(app, [*command, "--flipbank", bank, "--adapter", adapter])
        assert result.exit_code == 2 and "with adapter 'lora-r4'" in result.output, (command, result.output)


def test_a_base_store_never_resumes_into_an_adapted_run(organism, tmp_path: Path) -> None:
    from flipscope.data.questions import load_questions
    from flipscope.data.store import read_header
    from flipscope.experiments.evaluation import EvalConfig, run_sweep

    cfg = OrganismConfig.from_dict(organism[2]["config"])
    questions = load_questions(export_questions(cfg, tmp_path / "q", n_films=1))
    store = tmp_path / "run" / "results.jsonl"
    run_sweep(organism[0], questions, EvalConfig(), store, progress=False)
    tuned = HookedVLM.from_pretrained(default_organism_dir(), adapter=default_adapters_dir() / "lora-r4")
    with pytest.raises(FlipscopeError, match=r"different run \(differs in model\.adapter\b"):
        run_sweep(tuned, questions, EvalConfig(), store, progress=False)
    adapted = tmp_path / "adapted" / "results.jsonl"
    run_sweep(tuned, questions, EvalConfig(), adapted, progress=False)
    assert read_header(adapted)["model"]["adapter"] == "lora-r4" and "adapter" not in read_header(store)["model"]
