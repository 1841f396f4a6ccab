"""Choosing the SAE from evidence: sites ordered along the residual stream, the entry site named by
the trace, the organism's two SAEs and a GemmaScope 2 release listed, and `--sae auto` choosing the
organism's entry-site SAE from a trace of its FlipBank (and refusing when the trace names nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.errors import FlipscopeError
from flipscope.experiments.sites import (
    SiteCandidate,
    choose_site,
    entry_site,
    folder_candidates,
    release_candidates,
    site_position,
)
from flipscope.organism import default_organism_dir

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"


def _trace(entry: int | None, n: int = 32, share: float = 0.97) -> dict:
    profile = [{"layer": layer, "last position": {"value": share if layer == entry else 0.1}} for layer in range(4)]
    return {"n_cases": n, "explained": entry is not None, "entry_layer": entry, "profile": profile}


def test_sites_follow_the_residual_stream() -> None:
    order = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
             "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]  # fmt: skip
    assert [site_position(h) for h in order] == sorted(site_position(h) for h in order)
    assert site_position("blocks.3.hook_resid_post") == site_position("blocks.4.hook_resid_pre")
    assert entry_site(1) == "blocks.0.hook_attn_out" and entry_site(0) == "blocks.0.hook_resid_pre"
    with pytest.raises(FlipscopeError, match="'vision.hook_out' is not a decoder-layer site"):
        site_position("vision.hook_out")


def test_the_first_site_at_or_after_the_entry_is_chosen_with_the_mid_depth_beside_it() -> None:
    saes = [SiteCandidate(h, f"/saes/{h}") for h in
            ("blocks.2.hook_resid_post", "blocks.0.hook_attn_out", "blocks.1.hook_resid_post")]  # fmt: skip
    at_entry = choose_site(saes, _trace(1), n_layers=4)
    assert at_entry.chosen.hook == "blocks.0.hook_attn_out" and at_entry.after_entry
    assert at_entry.mid_depth.hook == "blocks.2.hook_resid_post"
    assert "blocks.0.hook_attn_out is where the trace says" in at_entry.reason and "brings back 0.97" in at_entry.reason
    later = choose_site(saes, _trace(2), n_layers=4)  # entry in layer 1's attention: the next site is layer 1's output
    assert later.chosen.hook == "blocks.1.hook_resid_post" and "the first SAE site after" in later.reason
    too_late = choose_site(saes[:1], _trace(4), n_layers=4)
    assert not too_late.after_entry and "still on its own words" in too_late.reason
    with pytest.raises(FlipscopeError, match="names no layer where the framing enters"):
        choose_site(saes, _trace(None), n_layers=4)


def test_the_organism_folder_and_a_gemmascope_release_list_their_sites(tmp_path: Path) -> None:
    found = {c.hook: Path(c.source).name for c in folder_candidates(default_organism_dir())}
    assert found == {"blocks.2.hook_resid_post": "sae", "blocks.0.hook_attn_out": "sae_entry"}
    download = tmp_path / "gemma-scope-2-4b-it"  # a GemmaScope 2 download: site/layer folders of params
    for site, layer in (("resid_post", 17), ("attn_out", 9)):
        folder = download / site / f"layer_{layer}_width_16k_l0_medium"
        folder.mkdir(parents=True)
        (folder / "params.safetensors").write_bytes(b"")  # listed by name; weights are read only when chosen
    assert {c.hook for c in folder_candidates(download)} == {"blocks.17.hook_resid_post", "blocks.9.attn.hook_z"}
    att = release_candidates("gemma-scope-2-4b-it-att")
    assert att and all(c.hook.endswith(".attn.hook_z") for c in att)
    res = release_candidates("gemma-scope-2-4b-it-res")
    paper = choose_site(res, _trace(18), n_layers=34)  # entry in layer 17's attention
    assert paper.chosen.hook == "blocks.17.hook_resid_post" and paper.chosen.sae_id == "layer_17_width_16k_l0_medium"
    with pytest.raises(FlipscopeError, match="sae-lens knows no release 'gemma-scope-9'"):
        release_candidates("gemma-scope-9")


def test_discover_with_sae_auto_reads_the_organisms_entry_sae(tmp_path: Path) -> None:
    out = tmp_path / "auto.features.json"
    run = CliRunner().invoke(app, ["discover", "--flipbank", str(BANK), "--sae", "auto", "--exact-top", "0",
                                   "--layers", "0", "--out", str(out)])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "site: " in run.output and "at blocks.0.hook_attn_out" in run.output
    assert "the paper's mid-depth site has an SAE too (blocks.2.hook_resid_post" in run.output
    found = json.loads(out.read_text())
    assert found["hook"] == "blocks.0.hook_attn_out"
    site = found["meta"]["site"]
    assert site["entry"] == "blocks.0.hook_attn_out" and site["entry_layer"] == 1 and site["after_entry"]
    assert site["candidates"] == ["blocks.0.hook_attn_out", "blocks.2.hook_resid_post"]
    assert found["framing"]["found"]
    trace = tmp_path / "flat.trace.json"  # a trace that names no entry: auto refuses, naming why
    trace.write_text(json.dumps(_trace(None, n=0)))
    refused = CliRunner().invoke(app, ["discover", "--flipbank", str(BANK), "--sae", "auto", "--trace", str(trace),
                                       "--exact-top", "0", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert refused.exit_code == 2 and "no flip could be traced" in refused.output
    args = ["discover", "--flipbank", str(BANK), "--sae", "auto", "--trace", str(trace)]
    missing = CliRunner().invoke(app, [*args, "--saes", str(tmp_path / "no-saes"), "--out", str(tmp_path / "y.json")])
    assert missing.exit_code == 2 and "is not a folder of SAEs" in missing.output


def test_patch_with_sae_auto_patches_at_the_site_a_trace_file_names(tmp_path: Path) -> None:
    trace = tmp_path / "bank.trace.json"
    trace.write_text(json.dumps(_trace(1)))
    out = tmp_path / "patch"
    two = f"{default_organism_dir() / 'sae'}, {default_organism_dir() / 'sae_entry'}"  # --saes: several sources
    run = CliRunner().invoke(app, ["patch", "--flipbank", str(BANK), "--sae", "auto", "--trace", str(trace),
                                   "--saes", two, "--features", "10,62", "--out", str(out)])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "removing features [10, 62] at blocks.0.hook_attn_out" in run.output
    written = json.loads((out / "patch.json").read_text())
    assert written["summary"]["setup"]["hook"] == written["site"]["chosen"]["hook"] == "blocks.0.hook_attn_out"
    assert written["site"]["candidates"] == ["blocks.0.hook_attn_out", "blocks.2.hook_resid_post"]
