"""`--features framing:K`: patch and clamp take the first K framing features of a discovery made
with the very SAE they load (its weights' digest), and refuse one made with another SAE, one that
labels no framing feature, and a malformed request, in one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.cli.features import feature_request, resolve_features
from flipscope.errors import FlipscopeError
from flipscope.experiments.discovery import load_discovery
from flipscope.organism import default_organism_dir
from flipscope.sae.load import load_sae, sae_digest

ROOT = Path(__file__).parents[1] / "flipbank" / "organism"
BANK = ROOT / "flipbank.json"
runner = CliRunner()


@pytest.fixture(scope="module")
def discovery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Discovery with the organism's own SAE (layer 2), as `flipscope discover` writes it."""
    out = tmp_path_factory.mktemp("disc") / "bank.features.json"
    run = runner.invoke(app, ["discover", "--flipbank", str(BANK), "--exact-top", "0", "--layers", "2",
                              "--out", str(out)])  # fmt: skip
    assert run.exit_code == 0, run.output
    return out


def test_the_digest_names_the_weights_not_the_folder() -> None:
    folder = default_organism_dir() / "sae"
    a, b = load_sae(folder), load_sae(folder)
    assert sae_digest(a) == sae_digest(b)
    with torch.no_grad():
        b.W_dec[3, 0] += 1e-3
    assert sae_digest(a) != sae_digest(b)


def test_patch_removes_the_first_k_framing_features_of_the_discovery(discovery: Path, tmp_path: Path) -> None:
    found = load_discovery(discovery)
    assert found.to_dict() == json.loads(discovery.read_text())  # read back whole
    assert found.meta["sae"]["digest"] == sae_digest(load_sae(default_organism_dir() / "sae"))
    first = found.framing_features(3)
    assert len(first) == 3 and first == [int(f) for f in found.table["feature"][:3]]  # the table is in that order
    out = tmp_path / "patch"
    run = runner.invoke(app, ["patch", "--flipbank", str(BANK), "--features", "framing:3", "--discovery",
                              str(discovery), "--no-wording-bound", "--out", str(out)])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert f"removing features {first} at blocks.2.hook_resid_post" in run.output
    assert json.loads((out / "patch.json").read_text())["summary"]["setup"]["features"] == first


def test_a_discovery_of_another_sae_is_refused(discovery: Path, tmp_path: Path) -> None:
    entry = load_sae(default_organism_dir() / "sae_entry")
    with pytest.raises(FlipscopeError, match=r"ranked another SAE's features \(blocks.2.hook_resid_post"):
        resolve_features(2, discovery, entry)
    trace = tmp_path / "t.json"  # --sae auto loads the entry SAE: the layer-2 ranking does not apply to it
    trace.write_text(json.dumps({"n_cases": 8, "explained": True, "entry_layer": 1, "profile": []}))
    run = runner.invoke(app, ["patch", "--flipbank", str(BANK), "--sae", "auto", "--trace", str(trace), "--features",
                              "framing:2", "--discovery", str(discovery), "--out", str(tmp_path / "p")])  # fmt: skip
    assert run.exit_code == 2 and "ranked another SAE's features" in run.output
    assert not (tmp_path / "p" / "patch.json").exists()


def test_a_discovery_without_a_digest_is_matched_by_its_sizes(discovery: Path, tmp_path: Path, capsys) -> None:
    data = json.loads(discovery.read_text())
    del data["meta"]["sae"]["digest"]
    old = tmp_path / "old.features.json"
    old.write_text(json.dumps(data))
    sae = load_sae(default_organism_dir() / "sae")
    assert resolve_features(2, old, sae) == load_discovery(discovery).framing_features(2)
    assert "matched to the SAE by its sizes only" in capsys.readouterr().out
    data["meta"]["sae"]["d_sae"] += 1
    old.write_text(json.dumps(data))
    with pytest.raises(FlipscopeError, match="ranked another SAE's features"):
        resolve_features(2, old, sae)


def test_a_discovery_with_no_framing_feature_and_bad_requests_are_one_line(discovery: Path, tmp_path: Path) -> None:
    sae = load_sae(default_organism_dir() / "sae")
    data = json.loads(discovery.read_text())
    for row in data["features"]:
        row["label"] = "answer readout"
    none = tmp_path / "none.features.json"
    none.write_text(json.dumps(data))
    with pytest.raises(FlipscopeError, match="labels no feature as carrying the framing"):
        resolve_features(2, none, sae)
    with pytest.raises(FlipscopeError, match="needs --discovery"):
        resolve_features(2, None, sae)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(FlipscopeError, match=r"is a JSON list; expected an object \(a discovery from"):
        resolve_features(2, tmp_path / "list.json", sae)
    (tmp_path / "other.json").write_text(json.dumps({"format": "flipscope-trace/1"}))
    with pytest.raises(FlipscopeError, match=r"not a discovery from flipscope discover \(format .flipscope-trace"):
        resolve_features(2, tmp_path / "other.json", sae)
    del data["meta"]
    (tmp_path / "cut.json").write_text(json.dumps(data))
    with pytest.raises(FlipscopeError, match="field 'meta' is missing"):
        resolve_features(2, tmp_path / "cut.json", sae)
    assert feature_request("38, 32") == [38, 32] and feature_request("framing:5") == 5
    for bad in ("framing:0", "top:3", "framing:x", ","):
        with pytest.raises(FlipscopeError, match="--features"):
            feature_request(bad)
    args = ["patch", "--flipbank", str(BANK), "--features", "framing:2"]
    run = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert run.exit_code == 2 and "flipbank.features.json' is not a JSON discovery" in run.output


def test_clamp_takes_the_ranking_and_keeps_its_table_apart(discovery: Path, tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join((ROOT / "questions.jsonl").read_text().splitlines()[:6]) + "\n")
    first = load_discovery(discovery).framing_features(4)
    run = runner.invoke(app, ["clamp", "--questions", str(questions), "--images", str(ROOT), "--features",
                              "framing:4", "--discovery", str(discovery), "--out", str(tmp_path / "c")])  # fmt: skip
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    column = lines[header].index("flip rate")
    label = f"{','.join(map(str, first))} = 0"
    row = next(line for line in lines if line.startswith(label))
    assert row[column - 1] == " " and lines[header + 1][column - 1] == " "
    report = json.loads((tmp_path / "c" / "clamp.json").read_text())
    assert row[column:].startswith(f"{report['interventions'][0]['summary']['overall']['flip_rate']['value']:.3f}")
