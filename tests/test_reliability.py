"""A long run that nothing quietly spoils: a non-finite margin is never an answer, images are checked
before the first forward, a resume survives a repaired image and a smaller batch, JSON results are
replaced whole or not at all, and a second writer is refused."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.atomic import write_atomic, write_json
from flipscope.data.flipbank import load_flipbank
from flipscope.data.questions import load_questions
from flipscope.data.store import iter_rows, read_header, read_rows
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import EvalConfig, questions_fingerprint, run_sweep
from flipscope.experiments.patching import patch_bank
from flipscope.experiments.summary import summarize
from flipscope.interventions.edited import ClampedVLM
from flipscope.organism import OrganismConfig, default_organism_dir, load_card, load_organism
from flipscope.organism.questions import export_questions

BANK = Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json"
PROGRESS = re.compile(r"\d+/\d+ \[[^\]]*(it/s|s/it)\]")
runner = CliRunner()


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    return export_questions(cfg, tmp_path_factory.mktemp("reliability-questions"), n_films=2)


def _small_bank(n: int = 4) -> dict:
    bank = load_flipbank(BANK)
    return {**bank, "flips": bank["flips"][:n], "controls": bank["controls"][:n]}


# ------------------------------------------------------------------------------ non-finite margins
def test_a_nan_model_stops_the_run_naming_the_prompt_and_records_nothing(organism, questions_file, tmp_path) -> None:
    vlm = copy.deepcopy(organism[0])
    with torch.no_grad():
        vlm.hf_model.model.language_model.norm.weight.fill_(float("nan"))
    store = tmp_path / "nan.jsonl"
    cfg = EvalConfig(questions_per_unit=4)
    with pytest.raises(
        FlipscopeError, match=r"non-finite margin \(nan\) for question '.+', prompt 0, condition 'image'"
    ):
        run_sweep(vlm, load_questions(questions_file), cfg, store, progress=False)
    assert read_rows(store) == []  # the header only: no NaN was recorded as "no"


def test_a_nan_sae_and_a_nan_clamp_are_refused(organism) -> None:
    vlm, sae, _ = organism
    broken = copy.deepcopy(sae)
    with torch.no_grad():
        broken.W_dec[38] = float("nan")
    with pytest.raises(FlipscopeError, match=r"non-finite patched margin \(nan\) for case"):
        patch_bank(vlm, broken, _small_bank(), [38], progress=False)
    for value in (float("nan"), float("inf")):
        with pytest.raises(FlipscopeError, match="not finite"):
            ClampedVLM(vlm, sae, {38: value})
    result = runner.invoke(
        app, ["clamp", "--questions", "q.jsonl", "--features", "38", "--values", "0,nan", "--out", "o"]
    )
    assert result.exit_code == 2 and "every clamp value must be a finite number" in result.output


def test_a_nan_margin_in_a_bank_is_refused(tmp_path: Path) -> None:
    bank = json.loads(BANK.read_text())
    bank["flips"][2]["paraphrase_margin"] = float("nan")
    path = tmp_path / "flipbank.json"
    path.write_text(json.dumps(bank))  # json writes NaN, which json.loads reads back
    with pytest.raises(FlipscopeError, match=r"flips\[2\].*field 'paraphrase_margin': expected float, got nan"):
        load_flipbank(path, image_root=BANK.parent)


# ------------------------------------------------------------------------------ early validation
def test_a_bad_image_is_found_before_the_first_forward(organism, questions_file, tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    lines = questions_file.read_text().splitlines()
    for line in lines:
        image = json.loads(line)["image"]
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).write_bytes((questions_file.parent / image).read_bytes())
    last = json.loads(lines[-1])["image"]
    (root / last).write_bytes((root / last).read_bytes()[:200])  # a truncated film, shown by the last questions
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    store = tmp_path / "out" / "results.jsonl"
    with pytest.raises(
        FlipscopeError, match=rf"(?s)the images \(nothing was run\): image file.*{last}.*used by .*q.jsonl:\d+"
    ):
        run_sweep(organism[0], load_questions(root / "q.jsonl"), EvalConfig(), store, progress=False)
    assert not store.parent.exists()


def test_resume_after_a_repaired_image_and_a_smaller_batch(organism, questions_file, tmp_path) -> None:
    vlm = organism[0]
    cfg = EvalConfig(questions_per_unit=4, batch_size=32)
    whole = tmp_path / "whole.jsonl"
    run_sweep(vlm, load_questions(questions_file), cfg, whole, progress=False)
    lines = whole.read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    first_units = [i for i, line in enumerate(lines) if b'"done"' in line][1] + 1
    cut.write_bytes(b"".join(lines[:first_units]))  # two units finished, then the run died

    image = questions_file.parent / json.loads(questions_file.read_text().splitlines()[0])["image"]
    pixels = Image.open(image)
    pixels.load()
    pixels.save(image, compress_level=1)  # repaired: other bytes, the same pixels
    run_sweep(vlm, load_questions(questions_file), EvalConfig(questions_per_unit=4, batch_size=5), cut, progress=False)

    assert read_header(cut) == read_header(whole)
    resumed, uninterrupted = read_rows(cut), read_rows(whole)
    assert cut.read_bytes()[: sum(map(len, lines[:first_units]))] == b"".join(lines[:first_units])
    assert [{k: v for k, v in r.items() if k not in ("margin", "p_yes", "entropy")} for r in resumed] == [
        {k: v for k, v in r.items() if k not in ("margin", "p_yes", "entropy")} for r in uninterrupted
    ]
    assert max(abs(a["margin"] - b["margin"]) for a, b in zip(resumed, uninterrupted, strict=True)) < 1e-4


# ------------------------------------------------------------------------------ atomic files
_KILLED_WRITE = """
import os, signal, sys
from flipscope.data.flipbank import load_flipbank, save_flipbank
bank = load_flipbank(sys.argv[1])
real = os.fsync
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the new bytes half on disk
save_flipbank(bank, sys.argv[2])
"""


def test_a_kill_or_a_full_disk_mid_write_leaves_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "flipbank.json"
    target.write_text('{"previous": true}\n')
    before = target.read_bytes()
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(BANK), str(target)], check=False)
    assert killed.returncode == -9
    assert target.read_bytes() == before

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    left_by_the_kill = sorted(tmp_path.iterdir())  # the killed writer's hidden temporary file, never read
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FlipscopeError, match=f"cannot write '{target}': No space left on device"):
        write_atomic(target, "x" * 10_000)
    assert target.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == left_by_the_kill  # the failed write removed its temporary file


def test_json_results_are_strict_json_and_a_refused_nan_writes_nothing(tmp_path: Path) -> None:
    summary = {"flip_rate": {"value": 0.25, "n": 8}, "swap": {"value": float("nan"), "n": 0}, "r": [1.0, float("inf")]}
    path = write_json(tmp_path / "summary.json", summary)
    # a statistic with no cases is null, which strict readers accept; NaN is not JSON
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "flip_rate": {"value": 0.25, "n": 8}, "swap": {"value": None, "n": 0}, "r": [1.0, None]
    }  # fmt: skip
    assert summary["swap"]["value"] != summary["swap"]["value"]  # the caller's object is left as it was
    with pytest.raises(FlipscopeError, match=r"card\.json' would hold a non-finite number"):
        write_json(tmp_path / "card.json", summary, allow_nan=False)
    assert not (tmp_path / "card.json").exists()


def test_an_atomic_write_keeps_the_permissions_open_would_give(tmp_path: Path) -> None:
    mask = os.umask(0o027)
    try:
        fresh = write_atomic(tmp_path / "fresh.json", "{}")
        assert fresh.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, not mkstemp's 0o600
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o604)
        write_atomic(kept, '{"new": 1}')
        assert kept.stat().st_mode & 0o777 == 0o604 and kept.read_text() == '{"new": 1}'
    finally:
        os.umask(mask)


def test_every_write_of_a_result_file_is_atomic() -> None:
    """Outside the atomic writer and the store's appends, nothing in flipscope writes a file in place."""
    package = Path(__file__).parents[1] / "flipscope"
    allowed = {"data/atomic.py", "data/store.py", "data/lock.py"}
    in_place = (".write_text(", ".write_bytes(", 'open("w', "open('w", "json.dump(", ".to_csv(path", ".write_html(")
    found = [
        f"{path.relative_to(package)}: {needle}"
        for path in package.rglob("*.py")
        if str(path.relative_to(package)) not in allowed
        for needle in in_place
        if needle in path.read_text()
    ]
    assert not found, found


@pytest.fixture(scope="module")
def evaluated(organism, questions_file, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("evaluated") / "results.jsonl"
    run_sweep(organism[0], load_questions(questions_file), EvalConfig(questions_per_unit=4), store, progress=False)
    return store


def _main(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    from flipscope.cli import main

    monkeypatch.setattr("sys.argv", ["flipscope", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # progress bars are not errors: tqdm ends them in "it/s]", or "s/it]" on a slow machine
    return exited.value.code, [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]


def test_curate_keeps_the_previous_bank_on_a_full_disk(evaluated, questions_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bank.json"
    out.write_text("previous\n")
    real = os.fsync

    def full(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".bank.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, err = _main(monkeypatch, capsys, "curate", "--results", str(evaluated), "--questions", str(questions_file),
                      "--out", str(out))  # fmt: skip
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.json"]


def test_a_damaged_store_is_named_by_curate_and_repaired_by_the_command(
    evaluated, questions_file, tmp_path, monkeypatch, capsys
) -> None:
    store = tmp_path / "results.jsonl"
    lines = evaluated.read_bytes().splitlines(keepends=True)
    lines[3] = b'{"question_id": "q0001", "mar\n'
    store.write_bytes(b"".join(lines))
    args = ("curate", "--results", str(store), "--questions", str(questions_file), "--out", str(tmp_path / "b.json"))
    code, err = _main(monkeypatch, capsys, *args)
    assert code == 2 and len(err) == 1 and "line 4 is cut off or not a JSON object" in err[0]
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(FlipscopeError, match="line 4 is cut off"):
        summarize(iter_rows(store))
    result = runner.invoke(app, ["repair", str(store)])
    assert result.exit_code == 0 and "dropped: lines 2-" in result.output
    assert (tmp_path / "results.jsonl.damaged").read_bytes() == b"".join(lines)
    n_units = sum(b'"done"' in line for line in lines)
    assert sum(b'"done"' in line for line in store.read_bytes().splitlines()) == n_units - 1


def test_questions_edited_since_the_evaluation_are_refused_by_curate_and_every_later_stage(
    evaluated, questions_file, tmp_path, monkeypatch, capsys
) -> None:
    """Edited wording would be paired with the old margins: curate names both digests and writes
    nothing; the override is recorded in the bank; a bank whose recorded questions differ from its
    evaluation's without that record is refused by every stage that loads it; clamp resuming a
    store of the old questions names both digests too."""
    edited = tmp_path / "questions.jsonl"
    lines = questions_file.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["paraphrases"][0] = "Honestly, " + record["paraphrases"][0]
    edited.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))
    (tmp_path / "images").symlink_to(questions_file.parent / "images")
    stored = read_header(evaluated)["questions"]["sha256"]
    now = questions_fingerprint(load_questions(edited))
    assert now != stored
    out = tmp_path / "bank.json"
    args = ("curate", "--results", str(evaluated), "--questions", str(edited), "--out", str(out))
    code, err = _main(monkeypatch, capsys, *args)
    assert code == 2 and len(err) == 1 and stored in err[0] and now in err[0], err
    assert "differ from those the evaluation ran on" in err[0] and not out.exists()

    code, _ = _main(monkeypatch, capsys, *args, "--allow-edited-questions")
    assert code in (0, None)
    bank = json.loads(out.read_text())
    assert bank["questions_edited"] == {"store": stored, "questions": now} and bank["questions_sha256"] == now
    load_flipbank(out)  # the recorded override loads
    del bank["questions_edited"]
    write_atomic(out, json.dumps(bank))
    with pytest.raises(FlipscopeError, match=f"{stored}.*{now}"):
        load_flipbank(out)

    clamp_out = tmp_path / "clamp"
    shutil.copytree(evaluated.parent, clamp_out / "baseline")
    code, err = _main(monkeypatch, capsys, "clamp", "--questions", str(edited), "--features", "38",
                      "--out", str(clamp_out))  # fmt: skip
    assert code == 2 and len(err) == 1 and f'questions.sha256: "{stored}" in the store, "{now}" now' in err[0], err


_HOLD = """
import sys, time
from flipscope.data.lock import StoreLock
lock = StoreLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_evaluate_on_one_out_exits_2_naming_the_holder(questions_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / "results.jsonl")], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, err = _main(monkeypatch, capsys, "evaluate", "--model", str(default_organism_dir()), "--questions",
                          str(questions_file), "--out", str(out))  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(err) == 1 and f"is being written by PID {holder.pid}" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl.lock"]  # nothing written twice: nothing at all


def test_a_prompt_longer_than_the_context_is_refused_before_the_first_forward(organism, questions_file, tmp_path):
    row = json.loads(questions_file.read_text().splitlines()[0])
    long = tmp_path / "q.jsonl"
    long.write_text(json.dumps({**row, "question": "Is there an effusion" + " ?" * 600}) + "\n")  # ~620 tokens
    assert organism[0].context_length == 512
    store = tmp_path / "out" / "results.jsonl"
    with pytest.raises(FlipscopeError, match=r"q.jsonl:1: prompt 0 takes about \d+ tokens .* context is 512"):
        run_sweep(organism[0], load_questions(long, questions_file.parent), EvalConfig(), store, progress=False)
    assert not store.parent.exists()


@pytest.mark.parametrize("command", ["discover", "patch", "clamp"])
def test_commands_keep_the_previous_result_on_a_full_disk(
    command, questions_file, tmp_path, monkeypatch, capsys
) -> None:
    from flipscope.data.flipbank import save_flipbank

    bank = save_flipbank(_small_bank(12), tmp_path / "bank" / "flipbank.json")
    found, patched, clamped = tmp_path / "found.json", tmp_path / "p", tmp_path / "c"
    target, args = {
        "discover": (found, ["--flipbank", str(bank), "--out", str(found)]),
        "patch": (patched / "patch.json", ["--flipbank", str(bank), "--features", "38", "--out", str(patched)]),
        "clamp": (
            clamped / "clamp.json",
            ["--questions", str(questions_file), "--features", "38", "--out", str(clamped)],
        ),
    }[command]
    target.parent.mkdir(exist_ok=True)
    target.write_text("previous\n")
    real = os.fsync

    def full(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{target.name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, err = _main(monkeypatch, capsys, command, *args)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert target.read_text() == "previous\n"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
