"""`flipscope demo` end to end: every figure, real PNGs, a report that loads cleanly in Chromium, and
numbers equal to those the individual CLI commands print."""

from __future__ import annotations

import html
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import load_page
from PIL import Image
from portable import demo_values, mismatches
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.atomic import write_json
from flipscope.data.flipbank import load_flipbank
from flipscope.reporting.claims import framing_heads
from flipscope.reporting.files import PNG_SIZE, png_renderer, save_figures
from flipscope.reporting.report import fmt

pytestmark = pytest.mark.costly(185)

FIGURES = (
    "margin_recovery",
    "recovery_distribution",
    "quadrants",
    "flip_rates",
    "feature_activation",
    "clamp_tradeoff",
    "layer_auc",
    "framing_entry",
    "head_trace",
    "lens_divergence",
    "site_recovery",
    "feature_count",
)
SHIPPED = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
EXPECTED = Path(__file__).parent / "data" / "demo_expected.json"
NO_CHROMIUM = "Chromium is not installed (`.ci/run` and `make` install Debian's chromium when run as root)"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "figures"
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "summary.json").read_text())


def test_the_run_finds_the_recorded_values(demo, request: pytest.FixtureRequest) -> None:
    """Every number of the summary, every answer and margin of the evaluation and every FlipBank
    case equal those recorded (`tests/data/demo_expected.json`) by the suite's rule for numbers:
    discrete outcomes exactly, floats within `portable.ATOL`/`RTOL`, rankings where the recorded
    scores are apart (`pytest --record-demo` records a new run)."""
    out, _, _ = demo
    values = demo_values(out)
    if request.config.getoption("--record-demo"):
        write_json(EXPECTED, values, indent=None)
        pytest.skip(f"recorded {EXPECTED}")
    problems = mismatches(values, json.loads(EXPECTED.read_text()))
    assert not problems, f"{len(problems)} value(s) depart from the recorded run:\n" + "\n".join(problems[:30])


def test_a_rerun_reads_each_finished_stage_back(demo, tmp_path: Path, monkeypatch) -> None:
    """Rerun on the demo's own work folder, nothing changed: every stage that computes is read back
    (each analysis it would call raises here), and the summary is the first run's."""
    out, _, first = demo
    for module, name in [("evaluation", "run_sweep"), ("discovery", "discover"), ("patching", "patch_bank"),
                         ("replication", "replicate"), ("upstream", "trace_framing"), ("lens", "lens_trajectory"),
                         ("clamping", "compare_clamped"), ("directions", "activation_by_family")]:  # fmt: skip
        monkeypatch.setattr(
            importlib.import_module(f"flipscope.experiments.{module}"),
            name,
            lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"),
        )
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--work", str(out / "work"), "--no-png"])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished before: read back from") == 9
    again = json.loads((tmp_path / "summary.json").read_text())
    skip = ("seconds", "seconds_read_back", "figures", "png_skipped")
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in first.items() if k not in skip}
    saved = again["seconds_read_back"]  # each stage read back: what computing it took the first time
    assert len(saved) == 9  # the first run's times held its records' writing too
    assert saved == pytest.approx({label: first["seconds"][label] for label in saved}, abs=0.5)
    assert "seconds_read_back" not in first


def test_a_resumed_run_is_byte_identical_to_the_uninterrupted_one(demo, tmp_path: Path) -> None:
    """On one machine the demo is bitwise deterministic: a run that died mid-evaluation and
    mid-clamp and is started again writes every store, the FlipBank, each stage's result and each
    figure byte for byte as the uninterrupted run did (the report and summary hold timings and
    paths, PNGs depend on the browser)."""
    out, _, _ = demo
    again = tmp_path / "figures"
    shutil.copytree(out, again)
    for name in ("evaluation/results.jsonl", "clamp/clamp-0/results.jsonl"):
        store = again / "work" / name
        lines = store.read_bytes().splitlines(keepends=True)
        store.write_bytes(b"".join(lines[: len(lines) // 3]))  # died mid-unit, a third of the way in
    for path in [*again.glob("*.html"), *again.glob("*.json"), *again.glob("work/*.json")]:
        path.unlink()
    result = CliRunner().invoke(app, ["demo", "--out", str(again), "--no-png"])
    assert result.exit_code == 0, result.output
    compared = [
        p.relative_to(out)
        for p in out.rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".html") and p.name not in ("summary.json", "report.html")
    ]
    assert len(compared) > 30
    differ = [str(p) for p in compared if (out / p).read_bytes() != (again / p).read_bytes()]
    assert not differ, f"{len(differ)} of {len(compared)} files differ after the resume: {differ}"


def test_the_report_reads_claims_off_the_numbers(demo) -> None:
    out, _, _ = demo
    readings = re.findall(r'<p class="reading">(.*?)</p>', (out / "report.html").read_text(), flags=re.S)
    assert len(readings) == 14
    text = " ".join(readings)
    assert not re.search(r"\bnan\b", text, flags=re.I)
    assert "The flips concentrate in the planted 'leading' family" in text  # its interval is above every other
    assert "carry the wording at blocks.2.hook_resid_post" in text  # features beat the framing null
    assert "the framing is still a feature" in text  # the entry site's CI above the SAE layer's
    assert "diverge from their originals more than the same-family non-flips from layer 0 on" in text
    assert "No framing mechanism" not in text
    assert "Head 0.0 carries the framing to the answer position" in text  # one head of layer 0 moves it there
    # switching that head off removes flips, but the head carries more than the framing: no cure
    assert "Switching off head 0.0 (its output replaced by its mean over the questions)" in text
    assert "it removes flips but costs accuracy, so the head carries more than the framing and is no cure" in text
    # removing the entry's five moves the non-flips about as far as their own framing words do, no further
    assert "under the patch at blocks.0.hook_attn_out" in text and "the patch does more than" not in text


def test_the_report_reads_both_sites_side_by_side(demo) -> None:
    out, _, summary = demo
    site = summary["site"]
    assert site["choice"]["chosen"]["hook"] == "blocks.0.hook_attn_out" and site["choice"]["entry_layer"] == 1
    entry, main = site["entry"]["patching"], summary["patching"]["discovered"]
    assert site["entry"]["found"] and entry["flips"]["mean_recovery"]["value"] >= 0.5
    assert entry["flips"]["mean_recovery"]["low"] > main["flips"]["mean_recovery"]["high"]
    assert abs(entry["matched_control_feature"]["mean_recovery"]["value"]) < 0.1
    for patched in (entry, main):  # each site's non-flips against their own framing words, paired
        bound = patched["controls"]["wording_bound"]
        assert bound["n"] == patched["controls"]["n"] and bound["difference"]["low"] <= 0
    page = (out / "report.html").read_text()
    assert "Where the framing is a feature, and where it is the answer" in page
    assert "At blocks.0.hook_attn_out the framing is still a feature: the 5 features" in page
    assert "entry (chosen by the trace): blocks.0.hook_attn_out" in page
    # how many features each site needs: a few at the entry; at the SAE's layer no count of its framing features
    assert site["entry"]["count"]["needed"]["k"] is not None and summary["patching"]["count"]["needed"]["k"] is None
    assert "How many features undo the flips" in page
    entry_reading = r"At blocks\.0\.hook_attn_out, features ranked by framing specificity: the first \d+ feature\(s\)"
    assert re.search(entry_reading + r" recover .*? enough to undo the flips", page)
    assert "At blocks.2.hook_resid_post, features ranked by framing specificity: no count up to" in page
    # where the removed features fire: a sentence per site from its dashboard, and the page behind it
    hooks = [summary["dashboards"][s]["hook"] for s in ("main", "entry")]
    assert hooks == ["blocks.2.hook_resid_post", "blocks.0.hook_attn_out"]
    first = next(iter(summary["dashboards"]["main"]["features"]))
    assert first == str(summary["discovery"]["patched"][0])
    assert f"At blocks.2.hook_resid_post: Feature {first} (active at" in page
    assert "at the last position, where the answer is read, the paraphrase raises it" in page
    for site in ("main", "entry"):
        assert f'href="dashboard_{site}.html"' in page and "<mark>" in (out / f"dashboard_{site}.html").read_text()


def test_demo_writes_every_figure_and_the_report(demo) -> None:
    out, output, summary = demo
    assert f"report: {out / 'report.html'}" in output
    assert "[11/11] writing the report" in output
    for name in FIGURES:
        assert (out / f"{name}.html").is_file()
        assert json.loads((out / f"{name}.json").read_text())["demo"]["seed"] == summary["settings"]["seed"]
    assert (out / "plotly.min.js").is_file()
    # every stage's time is recorded (how long is a benchmark's question, not a test's: a loaded machine is slower)
    seconds = summary["seconds"]
    assert (
        len(seconds) == 12
        and all(v >= 0 for v in seconds.values())
        and seconds["total"] >= max(v for k, v in seconds.items() if k != "total")
    )


def test_pngs_are_real_renderings(demo) -> None:
    ok, why = png_renderer()
    if not ok:
        pytest.skip(f"PNGs not rendered here: {why}")
    out, _, summary = demo
    assert summary["png_skipped"] is None and sorted(summary["figures"]["png"]) == sorted(f"{n}.png" for n in FIGURES)
    for name in FIGURES:
        image = Image.open(out / f"{name}.png")
        assert image.size == PNG_SIZE
        pixels = np.asarray(image.convert("RGB"), dtype=np.int64)
        assert (pixels.sum(-1) < 600).mean() > 0.01, f"{name}.png is nearly blank"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{name}.png has too few colours to be a plot"


def test_without_a_browser_pngs_are_skipped_and_say_why(demo, tmp_path: Path, monkeypatch) -> None:
    import plotly.graph_objects as go

    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    written = save_figures({"f": go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))}, tmp_path)
    assert written["png"] == [] and "no Chrome/Chromium found" in written["png_skipped"]
    assert (tmp_path / "f.html").is_file() and not (tmp_path / "f.png").exists()


def test_report_loads_in_headless_chromium_without_console_errors(demo) -> None:
    if not png_renderer()[0]:
        pytest.skip(NO_CHROMIUM)
    out, _, _ = demo
    problems, plots = load_page(
        (out / "report.html").resolve().as_uri(), "document.querySelectorAll('.main-svg').length"
    )
    assert problems == []
    assert plots >= len(FIGURES)  # every figure drew its SVG
    problems, _ = load_page((out / "margin_recovery.html").resolve().as_uri())
    assert problems == []


def _cli(command: str) -> str:
    args = shlex.split(command)
    assert args[0] == "flipscope"
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    return result.output


def test_report_numbers_are_those_the_cli_commands_print(demo) -> None:
    out, _, summary = demo
    report = (out / "report.html").read_text()
    commands = summary["commands"]
    # the demo's FlipBank is the shipped one
    bank, shipped = load_flipbank(summary["files"]["flipbank"]), load_flipbank(SHIPPED)
    assert [c["id"] for c in bank["flips"]] == [c["id"] for c in shipped["flips"]]
    np.testing.assert_allclose(
        [c["paraphrase_margin"] for c in bank["flips"]], [c["paraphrase_margin"] for c in shipped["flips"]], atol=1e-3
    )

    printed = _cli(commands["evaluate"])
    for key in ("flip_rate", "accuracy", "text_only_agreement"):
        number = fmt(summary["evaluation"]["overall"][key])
        assert number in printed and number in report, key

    printed = _cli(commands["patch_discovered"])
    number = fmt(summary["patching"]["discovered"]["flips"]["mean_recovery"])
    assert f"mean recovery {number}" in printed and number in report
    number = fmt(summary["patching"]["discovered"]["controls"]["mean_margin_change"])
    assert number in printed and number in report

    printed = _cli(commands["clamp"])  # resumes the demo's own stores: same model, clamps and direction
    for entry in summary["clamping"]["interventions"]:
        number = fmt(entry["summary"]["overall"]["flip_rate"])
        assert number in printed and number in report

    printed = _cli(commands["trace"])  # the heads that move the framing to the answer position
    heads = framing_heads(summary["upstream"]["heads"])
    assert heads.startswith("Head 0.0 carries the framing") and heads in printed and html.escape(heads) in report

    printed = _cli(commands["site"])  # the entry site the trace chose, from the demo's own trace
    entry = summary["site"]["entry"]
    assert f"site: {summary['site']['choice']['chosen']['label']} at {entry['hook']}" in printed
    assert entry["verdict"] in printed

    for name, count in (("count_main", summary["patching"]["count"]), ("count_entry", entry["count"])):
        printed = _cli(commands[name])  # the same features counted at the same site
        assert f"removed together at {count['hook']}" in printed
        assert count["needed"]["reading"] in printed and html.escape(count["needed"]["reading"]) in report

    printed = _cli(commands["discover"])
    verdict = summary["discovery"]["verdict"]
    assert verdict in printed and html.escape(verdict) in report
    first = summary["discovery"]["top"][0]
    row = f"{first['feature']:>7}  {first['label']:<18}{first['framing_share']:+7.3f}{first['framing_t']:+10.1f}"
    assert row in printed and f'<td class="num">{first["framing_t"]:+.1f}</td>' in report


def test_figures_script_redraws_from_the_summary(demo, tmp_path: Path) -> None:
    out, _, _ = demo
    script = Path(__file__).parents[1] / "analyses" / "figures.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out / "summary.json"), "--out", str(tmp_path), "--no-png"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in FIGURES:
        assert (tmp_path / f"{name}.html").read_text() == (out / f"{name}.html").read_text()


def test_the_trace_command_traces_the_layers_the_demo_traced() -> None:
    """A demo that looks at every `layer_stride`-th layer prints a trace command over those layers
    (the entry, and so the heads traced, could differ over all of them)."""
    from flipscope.reporting.commands import demo_commands
    from flipscope.reporting.demo import DemoConfig

    trace = {"layers": [0, 3, 6, 9, 12, 15, 17], "heads": {"carriers": [{"layer": 2, "head": 1}]}}
    args = (Path("org"), Path("q.json"), Path("work"), Path("bank.json"), [1], [], 1)
    sparse = demo_commands(*args, DemoConfig(layer_stride=3), None, trace)
    assert " --layers 0,3,6,9,12,15,17 " in sparse["trace"] and "--ablate-heads 2.1" in sparse["clamp"]
    every = demo_commands(*args, DemoConfig(), None, trace)
    assert "--layers" not in every["trace"] and "--ablate-heads 2.1" in every["clamp"]
