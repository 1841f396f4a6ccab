"""Honesty on a model with nothing planted: an organism trained with the shortcut off (a reduced
recipe, built here, with an entry-site SAE as the shipped organism has) flips only by noise, and
flipscope must say that no framing mechanism was found — in its card, in `discover` at both sites
and in the demo's report — where correlation with the margin shift alone would report a confident
discovery.

Whether such a model flips at all depends on float rounding (it may make a few flips on one CPU
and none on another), so each test holds on both branches; a collapsed organism, whose final norm
is zeroed so every prompt gets the same margin, makes the no-flip branch certain on any machine."""

from __future__ import annotations

import html
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.organism import OrganismConfig, build_organism, default_organism_dir
from flipscope.organism.entry_sae import train_entry_sae
from flipscope.reporting.demo import DemoConfig, run_demo

pytestmark = pytest.mark.costly(155)

NULL = OrganismConfig(shortcut_p=0.0, vision_steps=80, steps=250, sae_prompts=1500, sae_steps=800, test_items=40)
# the demo's stages as the command runs them, with one clamp value (the curve is not under test here)
DEMO = DemoConfig(n_films=80, clamp_values=(0.0,), trace_cases=32)


@pytest.fixture(scope="module")
def null_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("null")
    card = build_organism(NULL, root / "organism", progress=False)
    train_entry_sae(root / "organism", "blocks.0.hook_attn_out")  # a second site, as the shipped organism has
    lines: list[str] = []
    run_demo(root / "figures", organism=root / "organism", cfg=DEMO, png=False, progress=False, echo=lines.append)
    return root, card, "\n".join(lines)


def test_the_card_marks_no_framing_feature(null_run) -> None:
    _, card, _ = null_run
    directions = card["directions"]
    assert card["shortcut"]["p"] == 0.0
    assert not directions["framing_significant"]
    assert directions["framing_norm"] <= max(directions["framing_null_norms"])
    assert not any(f["aligned"] for f in card["framing_features"])


def test_discover_finds_no_framing_where_correlation_would_claim_one(null_run) -> None:
    root, _, _ = null_run
    work = root / "figures" / "work"
    bank = root / "loose.json"
    curated = CliRunner().invoke(
        app,
        ["curate", "--results", str(work / "evaluation"), "--questions", str(work / "data" / "questions.jsonl"),
         "--min-margin", "0", "--out", str(bank)],
    )  # fmt: skip
    assert curated.exit_code == 0, curated.output
    model = root / "organism"
    for sae in ("sae", "sae_entry"):  # the SAE's layer and the entry site: no mechanism at either
        out = root / f"loose.{sae}.features.json"
        args = ["discover", "--flipbank", str(bank), "--model", str(model), "--sae", str(model / sae)]
        run = CliRunner().invoke(app, [*args, "--exact-top", "0", "--out", str(out)])
        if not json.loads(bank.read_text())["n_flips"]:  # nothing to discover: said so, nothing written
            assert run.exit_code == 1 and "there is no flip to explain" in run.output, run.output
            assert not out.exists()
            return
        assert run.exit_code == 0, run.output
        found = json.loads(out.read_text())
        _claims_nothing(found["framing"], sae)
        assert "No framing mechanism" in run.output
    found = json.loads((root / "loose.sae.features.json").read_text())
    labels = {f["label"] for f in found["features"]}
    if found["framing"]["n_pairs"] >= 10:  # enough pairs for correlation's trap to show
        # by its parametric q-value, correlation "finds" features, and they are answer readout
        assert min(f["pearson_q"] for f in found["features"]) < 1e-3
        assert "answer readout" in labels


def _claims_nothing(framing: dict, sae: str) -> None:
    """No mechanism claimed; where a wording feature does shift further on the flips (selection on
    near-boundary answers can make it), the verdict says the flips lie within the wording's reach."""
    assert not framing["found"], (sae, framing["verdict"])
    assert framing["verdict"].startswith("No framing mechanism"), framing["verdict"]
    if framing["stronger_where_flipped"]:
        assert not framing["reach"]["beyond"] and "near-boundary answers" in framing["verdict"]


NULL_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def large_null_banks(null_run, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each seed's null organism (seed 0: the module's) with a 320-film FlipBank curated as loosely as
    the test above (every flip, however near 0), and discover's framing analysis at both sites."""
    out = []
    for seed in NULL_SEEDS:
        root = null_run[0] if seed == NULL.seed else tmp_path_factory.mktemp(f"null{seed}")
        model = root / "organism"
        if seed != NULL.seed:
            build_organism(replace(NULL, seed=seed), model, progress=False)
            train_entry_sae(model, "blocks.0.hook_attn_out")
        args = ["organism", "flipbank", "--organism", str(model), "--out", str(root / "large"), "--n-films", "320"]
        made = CliRunner().invoke(app, [*args, "--min-margin", "0"])
        assert made.exit_code == 0, made.output
        for sae in ("sae", "sae_entry"):
            found = root / f"large.{sae}.json"
            args = ["discover", "--flipbank", str(root / "large" / "flipbank.json"), "--model", str(model)]
            run = CliRunner().invoke(app, [*args, "--sae", str(model / sae), "--exact-top", "0", "--out", str(found)])
            assert run.exit_code == 0, run.output
            out.append({"seed": seed, "sae": sae, **json.loads(found.read_text())["framing"]})
    return out


@pytest.mark.slow
def test_no_mechanism_is_claimed_on_null_seeds_at_scale(large_null_banks) -> None:
    """Three null seeds x two sites, each on a bank of 100+ pairs: large enough that a wording feature
    tracking the margin shifts further on the (near-boundary) flips beyond the swap null, as it did
    on 5 of these 6 when this was written. The reach refuses every one: most flips sat nearer 0 than
    the wording moves its controls. A seed whose build flips too rarely for 100 pairs (one build on
    an AVX512 AMD EPYC's own kernels: 70; the suite trains on the portable ones) must still claim
    nothing; the test is then an expected failure that gives the sizes."""
    for framing in large_null_banks:
        _claims_nothing(framing, f"seed {framing['seed']} {framing['sae']}")
    at_scale = [f for f in large_null_banks if f["n_pairs"] >= 100]
    assert at_scale, [f["n_pairs"] for f in large_null_banks]
    for framing in at_scale:
        assert framing["reach"]["share_beyond"]["value"] < 0.5
    assert any(f["stronger_where_flipped"] for f in at_scale)  # the trap the reach closes is there
    if len(at_scale) < len(large_null_banks):
        pytest.xfail(f"banks of {[f['n_pairs'] for f in large_null_banks]} pairs: not every seed's build reaches 100")


def test_the_demo_report_claims_no_mechanism(null_run) -> None:
    root, _, output = null_run
    page = (root / "figures" / "report.html").read_text()
    sentences = re.findall(r'<p class="reading">(.*?)</p>', page, flags=re.S)
    readings = " ".join(sentences)
    # a wording feature may be named, even as read more strongly where flipped, but only inside a
    # sentence that claims no mechanism (near-boundary flips make the latter on some CPUs)
    named = r"carr(y|ies) the wording|further the same way where the answer flipped"
    assert all("No framing mechanism" in r for r in sentences if re.search(named, r))
    assert "still a feature" not in readings
    assert "The flips concentrate" not in readings
    assert "with no planted shortcut" in page
    assert not re.search(r"\bnan\b", readings, flags=re.I)
    summary = json.loads((root / "figures" / "summary.json").read_text())
    n_flips = summary["flipbank"]["n_flips"]
    if not n_flips:
        assert "nothing for feature discovery, patching, tracing or clamping to explain" in readings
        assert summary["discovery"] is None
        return
    assert "No framing mechanism" in readings
    lens = summary["lens"]
    if lens and lens["n_controls"] and lens["first_divergent_layer"] is not None:
        # the lens sentence says whether the flips' excess is more than selecting them gives, as its numbers do
        beyond = lens["first_layer_beyond_selection"]
        assert ("more than choosing flips for crossing zero gives" in readings) == (beyond is not None)
        assert ("Selection alone gives as much" in readings) == (beyond is None)
    if n_flips < 10:  # every estimate over the flips says how few they are
        patch = readings[readings.index("Subtracting") :]
        assert patch.count(f"(from only {n_flips} case") >= 3
    assert summary["discovery"]["found"] is False and "No framing mechanism" in summary["discovery"]["verdict"]
    # its framing words do not explain its flips, so no head is said to move them to the answer position
    heads = summary["upstream"]["heads"]
    assert not heads["explained"] and heads["carriers"] == []
    assert "so no head is named" in readings and "the framing to the answer position:" not in readings
    # the count of features that undo the flips says how they were ranked, and claims no framing
    count = summary["patching"]["count"]
    assert summary["discovery"]["patched_by"].startswith(count["ranked_by"])
    assert f"{count['hook']}, features ranked by {count['ranked_by']}: " in html.unescape(readings)


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The shipped organism with its final norm's gain at zero (Gemma's norm scales by 1 + w):
    every logit is 0, so every prompt's margin is the same and no answer can flip, on any CPU."""
    root = tmp_path_factory.mktemp("collapsed")
    organism = root / "organism"
    shutil.copytree(default_organism_dir(), organism)
    weights = load_file(organism / "model.safetensors")
    key = "language_model.model.norm.weight"
    weights[key] = torch.full_like(weights[key], -1.0)
    save_file(weights, organism / "model.safetensors", metadata={"format": "pt"})
    args = ["demo", "--organism", str(organism), "--out", str(root / "figures"), "--films", "10", "--no-png"]
    result = CliRunner().invoke(app, args)
    return root, result.output if result.exit_code == 0 else f"exit {result.exit_code}: {result.output}"


def test_a_model_without_flips_gets_a_report_that_says_so(collapsed_run) -> None:
    root, output = collapsed_run
    assert "no flips on 10 films" in output and "no flips to explain" in output, output
    summary = json.loads((root / "figures" / "summary.json").read_text())
    assert summary["flipbank"]["n_flips"] == 0
    assert summary["evaluation"]["overall"]["flip_rate"]["value"] == 0.0
    # one margin for every prompt: consistent and blind to the image, so every question is Dangerous
    assert summary["evaluation"]["by_quadrant"]["Dangerous"]["share"]["value"] == 1.0
    assert all(summary[k] is None for k in ("discovery", "patching", "upstream", "clamping"))
    page = (root / "figures" / "report.html").read_text()
    readings = " ".join(re.findall(r'<p class="reading">(.*?)</p>', page, flags=re.S))
    assert "No flips to explain" in page and "changed no answer under any paraphrase" in readings
    assert "<h2>1. Flip evaluation</h2>" in page and "Consistency × image reliance" in page
    assert "Causal patching" not in page and "Clamping" not in page
    assert not re.search(r"\bnan\b", readings, flags=re.I)
    assert sorted(p.name for p in (root / "figures").glob("*.html")) == [
        "flip_rates.html", "quadrants.html", "report.html"
    ]  # fmt: skip
    assert set(summary["commands"]) == {"evaluate", "curate"}
