"""Reading tables of records from the formats data releases use: JSON, JSONL, CSV, Parquet, and
HF `datasets` tables (in memory, or a folder saved with `save_to_disk`).

Each record comes with where it was read (`file:line` for text formats, `file:row i` otherwise),
so every later check can name the line a user must fix. Values are read leniently, as each format
writes them (an id may be an int, a boolean a string, an empty cell NaN)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["flag", "identifier", "not_a_record", "read_records", "text"]

_TRUE = {"true", "1", "yes", "t"}
_FALSE = {"false", "0", "no", "f"}


def read_records(source: Any) -> Iterator[tuple[str, Any]]:
    """`(file:line, record)` for every record of a JSON, JSONL, CSV or Parquet file, a folder a
    `datasets` table was saved to (`save_to_disk`), or a `datasets.Dataset` itself (a record that
    is not an object, or a line that is not JSON, comes back as a string saying why)."""
    if not isinstance(source, str | Path):  # a datasets.Dataset, or any sequence of row mappings
        name = getattr(getattr(source, "info", None), "dataset_name", None) or type(source).__name__
        for index, row in enumerate(source):
            yield f"{name}:row {index}", row
        return
    path = Path(source)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as err:
            raise FlipscopeError(f"{path} is a folder; reading a saved datasets table needs `datasets`") from err
        yield from read_records(load_from_disk(str(path)))
        return
    if not path.is_file():
        raise FlipscopeError(f"table {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield f"{path}:{number}", dict(row)
    elif suffix == ".parquet":
        import pandas as pd

        for index, row in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{path}:row {index}", row
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:{number}", _json(line)
    elif suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"))
        records = data.get("results") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise FlipscopeError(f"{path}: expected a JSON list of records, or an object with a 'results' list")
        for index, record in enumerate(records):
            yield f"{path}:record {index}", record
    else:
        raise FlipscopeError(f"{path}: unknown format {suffix!r}; expected .json, .jsonl, .csv or .parquet")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err})"


def flag(value: Any) -> bool | None:
    """A boolean column as CSV, Parquet or JSON writes it (None when absent or unreadable)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def text(value: Any) -> str | None:
    """A non-empty string, stripped (None otherwise)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def identifier(value: Any) -> str | None:
    """An id or file name as any format writes it (an int from JSON or Parquet), None when absent."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and value != value):  # NaN: empty
        return None
    return text(str(value))


def not_a_record(where: str, record: Any, noun: str = "record") -> str | None:
    """The problem line for a record that is not an object (a line that is not JSON comes back from
    `read_records` as a string saying why), or None for an object."""
    if isinstance(record, Mapping):
        return None
    got = record if isinstance(record, str) else type(record).__name__
    return f"{where}: expected a {noun} (an object), got {got}"
