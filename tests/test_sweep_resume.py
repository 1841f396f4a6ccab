"""A sweep killed with SIGKILL mid-run and rerun ends with the same store as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flipscope.data.questions import load_questions
from flipscope.data.store import read_rows
from flipscope.experiments.evaluation import EvalConfig, run_sweep
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions

RUN = """
import sys
from flipscope import HookedVLM
from flipscope.data.questions import load_questions
from flipscope.experiments.evaluation import EvalConfig, run_sweep
cfg = EvalConfig(conditions=("image", "blank"), batch_size=16, questions_per_unit=2)
run_sweep(HookedVLM.from_pretrained(sys.argv[1]), load_questions(sys.argv[2]), cfg, sys.argv[3], progress=False)
"""


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    return export_questions(cfg, tmp_path_factory.mktemp("resume-questions"), n_films=4)


def test_killed_run_resumes_to_the_uninterrupted_store(vlm_organism, questions_file: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(conditions=("image", "blank"), batch_size=16, questions_per_unit=2)
    whole = tmp_path / "whole.jsonl"
    run_sweep(vlm_organism, load_questions(questions_file), cfg, whole, progress=False)

    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", RUN, str(default_organism_dir()), str(questions_file), str(killed)]
    process = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if killed.exists() and killed.read_text().count('"done"') >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    done_before = killed.read_text().count('"done"')
    assert 2 <= done_before < 2 * 8  # killed mid-sweep: some units done, not all

    run_sweep(vlm_organism, load_questions(questions_file), cfg, killed, progress=False)
    assert killed.read_bytes() == whole.read_bytes()
    assert len(read_rows(killed)) == 16 * 10 * 2


@pytest.fixture(scope="module")
def vlm_organism():
    from flipscope.model import HookedVLM

    return HookedVLM.from_pretrained(default_organism_dir())


def test_two_shards_merged_equal_the_unsharded_store(vlm_organism, questions_file: Path, tmp_path: Path) -> None:
    from flipscope.errors import FlipscopeError
    from flipscope.experiments.shards import merge_shards

    cfg = EvalConfig(conditions=("image", "blank"), batch_size=16, questions_per_unit=3)
    questions = load_questions(questions_file)
    run_sweep(vlm_organism, questions, cfg, tmp_path / "single.jsonl", progress=False)
    for k in range(2):
        run_sweep(vlm_organism, questions, cfg, tmp_path / f"shard{k}.jsonl", shard=(k, 2), progress=False)
    assert 0 < len(read_rows(tmp_path / "shard0.jsonl")) < len(read_rows(tmp_path / "single.jsonl"))
    with pytest.raises(FlipscopeError, match="are not exactly 0/2 .. 1/2"):
        merge_shards([tmp_path / "shard0.jsonl"], tmp_path / "bad.jsonl")
    merge_shards([tmp_path / "shard1.jsonl", tmp_path / "shard0.jsonl"], tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()
