"""Launcher-native sharding: torchrun ranks and SLURM array tasks write the single-process store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.errors import FlipscopeError
from flipscope.experiments.launch import Launch, detect_launch, resolve_shard
from flipscope.organism import OrganismConfig, default_organism_dir, load_card
from flipscope.organism.questions import export_questions

pytestmark = pytest.mark.costly(23)

runner = CliRunner()
ORGANISM = str(default_organism_dir())


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            Launch(rank=1, world=2, launcher="torchrun", local_rank=1, distributed=True),
        ),
        ({"RANK": "0", "WORLD_SIZE": "4"}, Launch(rank=0, world=4, launcher="torchrun")),
        (
            {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_STEP": "2"}
            | {"SLURM_ARRAY_TASK_COUNT": "3"},
            Launch(rank=2, world=3, launcher="slurm-array"),
        ),
        (  # two srun tasks in each of two array tasks: four shards
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
            | {"SLURM_LOCALID": "1"},
            Launch(rank=3, world=4, launcher="slurm-array", local_rank=1),
        ),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, Launch(rank=2, world=3, launcher="slurm-tasks")),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # a plain batch job
    ],
)
def test_the_launch_is_read_from_the_launchers_environment(env: dict, expected: Launch | None) -> None:
    assert detect_launch(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "shard 2 of 2 is not 0 <= K < N"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not set"),
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "3"}, "grid"),
    ],
)
def test_a_broken_launch_environment_is_named(env: dict, message: str) -> None:
    with pytest.raises(FlipscopeError, match=message):
        detect_launch(env)


def test_the_shard_option() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert resolve_shard(None, torchrun) == resolve_shard("auto", torchrun) == detect_launch(torchrun)
    assert resolve_shard("none", torchrun) is None
    assert resolve_shard(None, {}) is None
    assert resolve_shard("1/3", {}) == Launch(rank=1, world=3, launcher="manual")
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: nothing to shard
    assert detect_launch(torchrun).device("cuda") == "cuda:1"  # type: ignore[union-attr]
    assert detect_launch(torchrun).device("cpu") == "cpu"  # type: ignore[union-attr]
    with pytest.raises(FlipscopeError, match="--shard auto: no launcher found"):
        resolve_shard("auto", {})
    with pytest.raises(FlipscopeError, match="is not K/N"):
        resolve_shard("half", {})


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 organism questions: two units of 16 questions per condition, so both shards have work."""
    cfg = OrganismConfig.from_dict(load_card(default_organism_dir())["config"])
    return export_questions(cfg, tmp_path_factory.mktemp("launch-questions"), n_films=5)


@pytest.fixture(scope="module")
def single(questions_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = runner.invoke(app, [*_evaluate(questions_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "results.jsonl"


def _evaluate(questions: Path) -> list[str]:
    return ["evaluate", "--model", ORGANISM, "--questions", str(questions), "--batch-size", "8"]


def test_torchrun_ranks_merge_into_the_single_process_store(questions_file: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "flipscope", *_evaluate(questions_file), "--out", str(out)]
    done = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for k in range(2):  # each rank computed its own half
        rows = (out / "shards" / f"{k}-of-2" / "results.jsonl").read_text().count('"question_id"')
        assert 0 < rows < single.read_text().count('"question_id"')
    assert (out / "results.jsonl").read_bytes() == single.read_bytes()
    assert (out / "summary.json").is_file()
    assert done.stdout.count("rows:") == 1  # rank 0 alone reports


def test_slurm_array_tasks_merge_and_refuse_other_options(
    questions_file: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, other = tmp_path / "array", tmp_path / "other"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for k in range(2):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(k))
        result = runner.invoke(app, [*_evaluate(questions_file), "--out", str(out)])
        assert result.exit_code == 0 and f"shard {k} of 2 (slurm-array) done" in result.output, result.output
        assert not (out / "results.jsonl").exists()
        extra = ["--blank", "white"] if k else []  # task 1 of a second job started with another option
        assert runner.invoke(app, [*_evaluate(questions_file), "--out", str(other), *extra]).exit_code == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(out), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert (merged / "results.jsonl").read_bytes() == single.read_bytes()
    result = runner.invoke(app, ["merge", str(other), "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2
    assert "started with other options" in result.output and "eval_config.blank: 'white' vs 'gray'" in result.output


def test_a_rerun_without_the_launcher_finishes_the_shards_and_merges(
    questions_file: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "half"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # task 0 never ran (preempted, say)
    assert runner.invoke(app, [*_evaluate(questions_file), "--out", str(out)]).exit_code == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    result = runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "early")])
    assert result.exit_code == 2 and "never started" in result.output
    result = runner.invoke(app, [*_evaluate(questions_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.jsonl").read_bytes() == single.read_bytes()


def test_patch_sweeps_and_clamping_shard_and_merge(questions_file: Path, tmp_path: Path) -> None:
    from flipscope.data.flipbank import load_flipbank
    from flipscope.data.questions import load_questions
    from flipscope.experiments.clamping import compare_clamped
    from flipscope.experiments.evaluation import EvalConfig
    from flipscope.experiments.pairs import collect_pairs
    from flipscope.experiments.sharded import run_sharded
    from flipscope.experiments.sweeps import patch_sweep
    from flipscope.model import HookedVLM
    from flipscope.sae.load import check_sae, load_sae

    vlm = HookedVLM.from_pretrained(ORGANISM)
    sae = load_sae(str(default_organism_dir() / "sae"))
    bank = load_flipbank(Path(__file__).parents[1] / "flipbank" / "organism" / "flipbank.json")
    pairs = collect_pairs(vlm, bank, [check_sae(sae, vlm)], progress=False)

    def sweep(part: tuple[int, int] | None, where: Path) -> object:
        return patch_sweep(vlm, sae, bank, [38, 3, 0], where, pairs=pairs, rows_per_forward=192, progress=False)

    def sharded_sweep(part: tuple[int, int] | None, where: Path) -> object:
        kw = {"pairs": pairs, "rows_per_forward": 192, "progress": False, "shard": part}
        return patch_sweep(vlm, sae, bank, [38, 3, 0], where, **kw)

    whole = run_sharded(sweep, tmp_path / "whole" / "sweep.jsonl", None)
    for k in range(2):
        assert (
            run_sharded(sharded_sweep, tmp_path / "s" / "sweep.jsonl", Launch(k, 2, "manual"), manual_in_place=False)
            is None
        )
    assert not (tmp_path / "s" / "sweep.jsonl").exists()
    merged = run_sharded(sharded_sweep, tmp_path / "s" / "sweep.jsonl", None)  # only merges: both shards are done
    assert merged is not None and whole is not None and merged.read_bytes() == whole.read_bytes()

    questions = load_questions(questions_file)
    cfg = EvalConfig(conditions=("image", "blank"), batch_size=16, questions_per_unit=8)
    report = compare_clamped(vlm, sae, questions, [{38: 0.0}], tmp_path / "clamp", cfg, progress=False)
    for k in range(2):
        launch = Launch(k, 2, "slurm-array")
        assert (
            compare_clamped(vlm, sae, questions, [{38: 0.0}], tmp_path / "c", cfg, progress=False, launch=launch)
            is None
        )
    again = compare_clamped(vlm, sae, questions, [{38: 0.0}], tmp_path / "c", cfg, progress=False)
    assert json.dumps(again) == json.dumps(report)  # (json: a NaN equals itself)
    for name in ("baseline", "clamp-0"):
        merged_store = (tmp_path / "c" / name / "results.jsonl").read_bytes()
        assert merged_store == (tmp_path / "clamp" / name / "results.jsonl").read_bytes()
