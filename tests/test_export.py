"""Parquet export of a store: the same rows as `read_rows`, streamed in row groups, written atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flipscope.cli import app
from flipscope.data.export import export_parquet
from flipscope.data.store import ResultStore, iter_rows, read_rows
from flipscope.errors import FlipscopeError


def _store(path: Path, units: int, strategy_of=lambda unit, k: None if k == 0 else "leading") -> Path:
    store = ResultStore.open(path, {"kind": "test"})
    for unit in range(units):
        rows = [
            {"question_id": f"q{unit}", "prompt_index": k, "strategy": strategy_of(unit, k), "margin": 0.25 * k - unit}
            for k in range(4)
        ]
        store.append(f"u{unit}", rows)
    return path


def test_the_parquet_file_holds_every_row_of_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "results.jsonl", 9)
    first_group_all_none = _store(tmp_path / "none.jsonl", 3, lambda unit, k: None if unit == 0 else "neutral")
    for path in (store, first_group_all_none):
        out = export_parquet(path, tmp_path / f"{path.stem}.parquet", rows_per_group=4)
        pd.testing.assert_frame_equal(pd.read_parquet(out), pd.DataFrame(read_rows(path)))
    assert list(iter_rows(store)) == read_rows(store)
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--parquet", str(tmp_path / "cli.parquet")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "cli.parquet")) == 36
    assert not list(tmp_path.glob(".*partial"))


def test_bad_input_is_named_and_leaves_no_file(tmp_path: Path) -> None:
    mixed = _store(tmp_path / "mixed.jsonl", 3, lambda unit, k: "text" if unit == 0 else 7)
    with pytest.raises(FlipscopeError, match="a column changes type"):
        export_parquet(mixed, tmp_path / "mixed.parquet", rows_per_group=4)
    with pytest.raises(FlipscopeError, match="does not exist"):
        export_parquet(tmp_path / "nope.jsonl", tmp_path / "nope.parquet")
    assert not (tmp_path / "mixed.parquet").exists() and not (tmp_path / "nope.parquet").exists()
    assert not list(tmp_path.glob(".*partial"))
