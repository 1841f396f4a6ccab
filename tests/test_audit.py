"""Cures and their audit: the weight edit and the fine-tunes load like any model, a layer-restricted LoRA
adapts only its layers, and the audit pairs every cure with the base per question and words a
verdict only as its intervals allow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.errors import FlipscopeError
from flipscope.experiments.audit import NON_INFERIORITY, verdict
from flipscope.model.hooked import HookedVLM
from flipscope.organism import OrganismConfig, default_organism_dir, load_organism
from flipscope.organism.cures import cure_finetune_config, make_cure
from flipscope.organism.finetune import FinetuneConfig, default_adapters_dir, finetune

pytestmark = pytest.mark.costly(17)

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


def _paired(flips: tuple[float, float, float], danger: tuple[float, float, float]) -> dict:
    def one(v):
        return {"change": {"value": v[0], "low": v[1], "high": v[2]}}

    return {"flip_rate": one(flips), "dangerous_share": one(danger)}


def test_the_verdict_follows_the_intervals() -> None:
    fewer = (-0.1, -0.15, -0.05)
    assert verdict(_paired(fewer, (0.0, -0.01, NON_INFERIORITY))) == "cured"
    assert verdict(_paired(fewer, (0.08, 0.03, 0.12))) == "trap"
    assert verdict(_paired(fewer, (0.01, -0.01, 0.05))) == "unresolved"
    assert verdict(_paired((-0.02, -0.06, 0.01), (0.0, -0.01, 0.0))) == "no_fewer_flips"
    assert verdict(_paired((0.05, 0.01, 0.09), (0.0, -0.01, 0.0))) == "more_flips"


def test_a_consistency_lora_adapts_only_its_layers_and_records_how_it_was_made(tmp_path: Path) -> None:
    vlm, _, card = load_organism()
    cfg = OrganismConfig.from_dict(card["config"])
    ft = FinetuneConfig(**{**vars(cure_finetune_config("consistency", [1], ["formal"])), "steps": 3, "batch_size": 4})
    log = finetune(vlm, cfg, ft, tmp_path / "consistency")
    assert log["config"]["objective"] == "consistency" and log["config"]["layers"] == [1]
    with safe_open(tmp_path / "consistency" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".layers.1." in k for k in keys)
    tuned = HookedVLM.from_pretrained(default_organism_dir(), adapter=tmp_path / "consistency")
    assert (
        tuned.identity()["adapter"] == "consistency"
        and tuned.identity()["fingerprint"] != vlm.identity()["fingerprint"]
    )
    with pytest.raises(FlipscopeError, match="objective"):
        FinetuneConfig(name="x", objective="vibes")


def test_the_audit_pairs_each_cure_with_the_base_and_resumes(tmp_path: Path) -> None:
    record = make_cure("fold", tmp_path / "cures" / "fold", flipbank=BANK)
    assert record["n_flips"] >= 10 and json.loads((tmp_path / "cures" / "fold" / "cure.json").read_text())[
        "layers"
    ] == [0]
    text_lora = str(default_adapters_dir() / "lora-r4-text")
    args = ["mitigate", "audit", str(tmp_path / "cures" / "fold"), "clamp:38,3", text_lora,
            "--films", "6", "--out", str(tmp_path / "audit"), "--no-png"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert found["n_questions"] == 24 and found["withheld"] == ["formal"]
    names = [c["name"] for c in found["cures"]]
    assert names == ["fold", "clamp-38-3", "lora-r4-text"]
    fold, clamp, lora = found["cures"]
    assert fold["identity"]["weight_edit"][0]["layers"] == [0] and lora["identity"]["adapter"] == "lora-r4-text"
    assert clamp["identity"]["clamp"]["values"] == {"38": 0.0, "3": 0.0}
    base_dangerous = round(found["base"]["dangerous_share"] * 24)
    for cure in found["cures"]:
        assert set(cure["paired"]) == {"flip_rate", "flip_rate_withheld", "accuracy", "dangerous_share",
                                       "text_only_agreement", "dangerous_opposite", "survives_opposite"}  # fmt: skip
        assert cure["verdict"] == verdict(cure["paired"])
        assert cure["verdict_opposite"] == verdict(cure["paired"], "dangerous_opposite")
        moved = cure["into_dangerous"]
        gained = moved["from_worst"] + moved["from_image_reliant"] - moved["left"]
        assert round(cure["rates"]["dangerous_share"] * 24) - base_dangerous == gained
        assert cure["rates"]["dangerous_opposite"] <= cure["rates"]["survives_opposite"]
        for p in cure["paired"].values():
            assert p["change"]["low"] <= p["change"]["value"] <= p["change"]["high"] and 0 <= p["mcnemar_p"] <= 1
    questions = [
        json.loads(line) for line in (tmp_path / "audit" / "data" / "questions.jsonl").read_text().splitlines()
    ]
    assert questions[0]["id"] == "film0040-opacity"  # after the films the FlipBank (and the fold's direction) used
    assert "nan" not in result.output and (tmp_path / "audit" / "audit.html").is_file()
    stores = {n: (tmp_path / "audit" / n / "results.jsonl").read_bytes() for n in ["base", *names]}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads((tmp_path / "audit" / "audit.json").read_text()) == found
    assert {n: (tmp_path / "audit" / n / "results.jsonl").read_bytes() for n in stores} == stores
    same = CliRunner().invoke(app, ["mitigate", "audit", str(default_organism_dir()), "--films", "6", "--out",
                                    str(tmp_path / "audit"), "--no-png"])  # fmt: skip
    assert same.exit_code == 0, same.output  # the base itself as a "cure": no verdict of a cure
    itself = json.loads((tmp_path / "audit" / "audit.json").read_text())["cures"][0]
    assert itself["verdict"] == itself["verdict_opposite"] == "no_fewer_flips"
    assert all(p["change"]["value"] == 0.0 for p in itself["paired"].values())
    bad = CliRunner().invoke(app, ["mitigate", "audit", str(tmp_path), "--out", str(tmp_path / "a2")])
    assert bad.exit_code == 2 and "not clamp:FEATURES, an adapter folder or a checkpoint folder" in bad.output


def test_the_fold_takes_decoder_rows_or_a_file_and_refuses_anything_else(tmp_path: Path) -> None:
    import numpy as np

    def cure(*args: str):
        return CliRunner().invoke(app, ["mitigate", "cure", "fold", *args])

    rows = cure("--direction", "features:38,3", "--layers", "0,1", "--components", "attn,mlp", "--out",
                str(tmp_path / "rows"))  # fmt: skip
    assert rows.exit_code == 0 and "features:38,3 removed from the attn+mlp writers of layers [0, 1]" in rows.output
    record = json.loads((tmp_path / "rows" / "cure.json").read_text())
    assert record["features"] == [38, 3] and len(record["vectors"]) == 2
    folded = HookedVLM.from_pretrained(tmp_path / "rows")
    assert folded.identity()["weight_edit"][0]["name"] == "features:38,3"
    np.save(tmp_path / "v.npy", np.ones(folded.d_model, dtype=np.float32))
    assert cure("--direction", str(tmp_path / "v.npy"), "--out", str(tmp_path / "file")).exit_code == 0
    for args, said in (
        (["--direction", "sideways"], "expected framing, diffmean, features:F1,F2 or a .npy file"),
        (["--direction", "framing"], "needs --flipbank"),
        (["--direction", "features:9999"], "features must lie in"),
    ):
        bad = cure(*args, "--out", str(tmp_path / "bad"))
        assert bad.exit_code == 2 and said in bad.output, bad.output


def test_the_audit_sends_each_film_through_the_tower_once(tmp_path: Path) -> None:
    """The base, its clamp cures and a text-only LoRA cure loaded on its own (its tower holds the
    base's weights) share one image memo: every film (and the blank) is encoded once for the whole
    audit, and every store is byte for byte what a tower run per prompt writes. A cure whose tower
    differs keeps its own memo."""
    from flipscope.data.questions import load_questions
    from flipscope.experiments.audit import audit_cures
    from flipscope.interventions.edited import ClampedVLM
    from flipscope.model.vision_once import share_image_memo
    from flipscope.organism import organism_checkpoint
    from flipscope.organism.questions import export_questions

    text_lora = default_adapters_dir() / "lora-r4-text"

    def audit(out: Path, memo_bytes: int) -> tuple[int, dict[str, bytes]]:
        vlm, sae, card = load_organism()
        vlm.image_memo.max_bytes = memo_bytes
        lora = HookedVLM.from_pretrained(organism_checkpoint(), adapter=text_lora)
        images = [0]

        def count(module, args, kwargs, output) -> None:
            images[0] += len(args[0] if args else kwargs["pixel_values"])

        handles = [m.hf_model.model.vision_tower.register_forward_hook(count, with_kwargs=True) for m in (vlm, lora)]
        questions = load_questions(
            export_questions(OrganismConfig.from_dict(card["config"]), out / "data", n_films=4, first=40)
        )
        cures = {"clamp-38": ClampedVLM(vlm, sae, {38: 0.0}), "clamp-3": ClampedVLM(vlm, sae, {3: 0.0}), "lora": lora}
        audit_cures(vlm, cures, questions, out, progress=False)
        for handle in handles:
            handle.remove()
        assert len({q.image for q in questions}) == 4
        return images[0], {n: (out / n / "results.jsonl").read_bytes() for n in ("base", *cures)}

    encoded, stores = audit(tmp_path / "memo", memo_bytes=1 << 30)
    every, reference = audit(tmp_path / "no-memo", memo_bytes=0)
    assert encoded <= 4 + 1  # the four films and the blank, once each
    assert every >= 4 * encoded  # without the memo: per model, and again per opposite-film prompt
    assert stores == reference

    base = load_organism()[0]
    other = HookedVLM.from_pretrained(organism_checkpoint())
    with torch.no_grad():
        next(other.hf_model.model.vision_tower.parameters()).add_(1e-3)
    assert not share_image_memo(base, other) and other.image_memo is not base.image_memo
