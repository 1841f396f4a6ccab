# ruff: noqa: E501
"""Hostile and broken input: every case is one line on stderr, exit status 2, and nothing left behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flipscope.organism import default_organism_dir

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
QUESTIONS = BANK.parent / "questions.jsonl"


def _organism_copy(root: Path, name: str, edit: Callable[[Path], None]) -> Path:
    folder = root / name
    shutil.copytree(default_organism_dir(), folder, ignore=shutil.ignore_patterns("ground_truth.json"))
    edit(folder)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _questions(root: Path, name: str, line: bytes) -> Path:
    path = root / name
    path.write_bytes(QUESTIONS.read_bytes().splitlines(keepends=True)[0] + line)
    return path


def _bomb(root: Path) -> Path:
    Image.new("1", (14_000, 14_000)).save(root / "bomb.png")  # 196 Mpixel in a few kB
    row = json.loads(QUESTIONS.read_text().splitlines()[0])
    (root / "bomb.jsonl").write_text(json.dumps({**row, "id": "bomb", "image": "bomb.png"}) + "\n")
    return root / "bomb.jsonl"


def _cases(root: Path) -> list[tuple[tuple[str, ...], str]]:
    organism = str(default_organism_dir())
    out = str(root / "out")
    a_file = root / "a_file"
    a_file.write_text("not a folder\n")
    (root / "latin1.json").write_bytes(b'{"format": "flipbank/1", "note": "\xe9panchement"}')
    (root / "list.json").write_text("[1, 2]")
    bank = json.loads(BANK.read_text())
    (root / "no_flips.json").write_text(json.dumps({**bank, "flips": [], "n_flips": 0}))
    shutil.copytree(BANK.parent / "images", root / "images")
    (root / "config_list.json").write_text("[]")
    sae_cut = _organism_copy(root, "sae_cut", lambda f: _truncate(f / "sae" / "sae_weights.safetensors"))
    sae_cfg = _organism_copy(root, "sae_cfg", lambda f: (f / "sae" / "cfg.json").write_text("{not json"))
    weights_cut = _organism_copy(root, "weights_cut", lambda f: _truncate(f / "model.safetensors"))
    no_tok = _organism_copy(
        root, "no_tok", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]
    )
    shapes = _organism_copy(
        root, "shapes", lambda f: _edit_json(f / "config.json", lambda c: c["text_config"].update(intermediate_size=48))
    )
    remote = _organism_copy(
        root, "remote", lambda f: _edit_json(f / "config.json", lambda c: c.update(auto_map={"AutoConfig": "x.Config"}))
    )
    escape = _organism_copy(
        root,
        "escape",
        lambda f: (f / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    )
    evaluate = ("evaluate", "--model", organism, "--questions")
    return [
        ((*evaluate, str(_questions(root, "latin1.jsonl", b'{"id": "\xe9"}\n')), "--out", out), "latin1.jsonl:2: not valid JSON (not UTF-8 text"),
        ((*evaluate, str(_questions(root, "huge.jsonl", b'{"id": "' + b"x" * 3_000_000 + b'"}\n')), "--out", out), "huge.jsonl:2: not valid JSON (3000011 bytes; a line holds at most"),
        ((*evaluate, str(_questions(root, "long.jsonl", json.dumps({**json.loads(QUESTIONS.read_text().splitlines()[0]), "id": "long", "question": "Is there " * 300}).encode() + b"\n")), "--out", out), "field 'question': expected at most 2000 characters"),
        ((*evaluate, str(_bomb(root)), "--out", out), "bomb.png' is not a readable image"),
        ((*evaluate, str(QUESTIONS), "--out", out, "--generate-tokens", "-3"), "generate_tokens -3 is negative"),
        ((*evaluate, str(QUESTIONS), "--out", out, "--device", "cuda:7"), "device 'cuda:7'"),
        ((*evaluate, str(QUESTIONS), "--out", str(a_file)), "is a file; expected a folder"),
        (("evaluate", "--model", str(weights_cut), "--questions", str(QUESTIONS), "--out", out), "could not load the weights of"),
        (("hooks", str(no_tok)), "has no usable processor or tokenizer"),
        (("hooks", str(shapes)), "could not load the weights of"),
        (("hooks", str(remote)), "asks for remote code (auto_map); flipscope never runs code from a model folder"),
        (("hooks", str(escape)), "cannot be rendered (SecurityError"),
        (("discover", "--flipbank", str(root / "latin1.json")), "not UTF-8 text"),
        (("discover", "--flipbank", str(root / "list.json")), "is a JSON list; expected an object"),
        (("discover", "--flipbank", str(root / "no_flips.json"), "--out", str(root / "f.json")), "has no flip cases"),
        (("discover", "--flipbank", str(BANK), "--sae", str(sae_cut / "sae"), "--out", str(root / "f.json")), "cannot load the SAE in"),
        (("discover", "--flipbank", str(BANK), "--sae", str(sae_cfg / "sae"), "--out", str(root / "f.json")), "is not a JSON SAE config"),
        (("discover", "--flipbank", str(BANK), "--out", str(a_file / "f.json")), "cannot be made"),
        (("patch", "--flipbank", str(BANK), "--features", "38", "--sweep", "9-3", "--out", out), "expected a range LOW-HIGH"),
        (("patch", "--flipbank", str(BANK), "--features", "38", "--out", str(a_file)), "is a file; expected a folder"),
        (("trace", "--flipbank", str(BANK), "--out", str(a_file / "t.json")), "cannot be made"),
        (("clamp", "--questions", str(QUESTIONS), "--features", "38", "--out", str(a_file)), "is a file; expected a folder"),
        (("curate", "--results", str(root), "--questions", str(QUESTIONS), "--out", str(root)), "is a folder; expected a file"),
        (("merge", str(root), "--out", str(a_file)), "is a file; expected a folder"),
        (("demo", "--out", str(a_file)), "is a file; expected a folder"),
        (("organism", "build", "--config", str(root / "config_list.json"), "--out", out), "is a JSON list; expected an object"),
        (("organism", "build", "--out", str(a_file)), "is a file; expected a folder"),
        (("organism", "flipbank", "--out", str(a_file)), "is a file; expected a folder"),
        (("trace", "--flipbank", str(BANK), "--batch-size", "0"), "'--batch-size': Input should be greater than or equal to 1"),
        (("discover", "--flipbank", str(BANK), "--batch-size", "0"), "'--batch-size': Input should be greater than or equal to 1"),
        (("discover", "--flipbank", str(BANK), "--exact-top", "-1"), "'--exact-top': Input should be greater than or equal to 0"),
        (("lens", "--flipbank", str(BANK), "--n-random", "0"), "'--n-random': Input should be greater than or equal to 1"),
        (("curate", "--results", str(root), "--questions", str(QUESTIONS), "--min-margin", "-1", "--out", out), "'--min-margin': Input should be greater than or equal to 0"),
        (("demo", "--films", "0", "--out", out), "'--films': Input should be greater than or equal to 1"),
        (("organism", "flipbank", "--n-films", "0", "--out", out), "'--n-films': Input should be greater than or equal to 1"),
    ]  # fmt: skip


def test_every_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    from flipscope.cli import main

    cases = _cases(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    failures = []
    for args, message in cases:
        monkeypatch.setattr("sys.argv", ["flipscope", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        ok = exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
        if not ok or "Traceback" in captured.out + captured.err:
            failures.append((args[:2], exited.value.code, captured.err[-600:]))
    assert not failures, "\n".join(map(str, failures))
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no output folder, no half file, no lock


def test_a_decompression_bomb_is_refused_by_the_image_loader(tmp_path: Path) -> None:
    from flipscope.errors import FlipscopeError
    from flipscope.model.images import load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(path)
    with pytest.raises(FlipscopeError, match="bomb.png' is not a readable image .*decompression bomb"):
        load_image(path)
    assert np.asarray(load_image(BANK.parent / "images" / "film0000.png")).ndim == 3


def test_the_library_refuses_what_the_options_refuse(tmp_path: Path) -> None:
    """A negative margin bound or no films is refused from Python too, not read as a default."""
    from flipscope.data.curation import CurationRules
    from flipscope.errors import FlipscopeError
    from flipscope.organism import OrganismConfig
    from flipscope.organism.questions import export_questions

    with pytest.raises(FlipscopeError, match="min_margin -0.5 is negative"):
        CurationRules(min_margin=-0.5)
    with pytest.raises(FlipscopeError, match="n_films 0: expected at least 1 film"):
        export_questions(OrganismConfig(), tmp_path / "q", n_films=0)
    assert len(export_questions(OrganismConfig(), tmp_path / "q", n_films=1).read_text().splitlines()) == 4
    from flipscope.reporting.demo_config import DemoConfig

    with pytest.raises(FlipscopeError, match=r"demo settings: top_k 0 \(at least 1\); layer_stride -1 \(at least 1\)"):
        DemoConfig(top_k=0, layer_stride=-1)
