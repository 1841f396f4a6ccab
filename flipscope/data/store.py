"""Results written as they are computed, resumable after a crash at any point.

A store is one JSONL file. Line 1 is the header: the config and model identity that produced it.
Then, for each unit of work (e.g. a chunk of questions under one condition), its rows (one per
question × prompt × condition) followed by a marker line `{"done": unit, "rows": n}`, each flushed
and fsynced. Opening an existing store checks that the header matches, drops anything after the
last marker (a unit cut off mid-write), and reports the finished units, so a rerun of the same
command computes only what is missing and ends with exactly the file an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["ResultStore", "iter_rows", "iter_units", "read_header", "read_rows", "read_units"]

_HEADER_KEY = "flipscope_store"
_FORMAT = 1


def _lines(path: Path) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
    """(end offset, line number, parsed record or None if the line is cut off or corrupt)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            offset += len(raw)
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            yield offset, number, record


class ResultStore:
    """An append-only, resumable results file (format in the module docstring)."""

    def __init__(self, path: Path, header: dict[str, Any], done: dict[str, int]) -> None:
        self.path = path
        self.header = header
        self.done = done

    @classmethod
    def open(cls, path: str | Path, header: dict[str, Any]) -> ResultStore:
        """Open `path` for `header`'s run: create it, or resume it if it holds the same run.

        Raises:
            FlipscopeError: the file holds a different run (names the first differing field).
        """
        path = Path(path)
        header = json.loads(json.dumps(header))  # as it reads back from disk
        if not path.exists() or path.stat().st_size == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as handle:
                handle.write(json.dumps({_HEADER_KEY: _FORMAT, "header": header}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            return cls(path, header, {})
        existing = read_header(path)
        if existing != header:
            differing = sorted(k for k in set(existing) | set(header) if existing.get(k) != header.get(k))
            raise FlipscopeError(
                f"store {str(path)!r} was written by a different run (differs in {differing}); "
                "use another output directory or delete it"
            )
        done: dict[str, int] = {}
        keep = 0
        for offset, number, record in _lines(path):
            if number == 1:
                keep = offset
            elif record is None:
                break
            elif "done" in record:
                done[record["done"]] = record["rows"]
                keep = offset
        if keep < path.stat().st_size:
            with path.open("r+b") as handle:
                handle.truncate(keep)
        return cls(path, header, done)

    def append(self, unit: str, rows: Sequence[dict[str, Any]]) -> None:
        """Write one unit's rows and its marker, durably."""
        if unit in self.done:
            raise FlipscopeError(f"unit {unit!r} is already in {str(self.path)!r}")
        payload = "".join(json.dumps(row) + "\n" for row in rows)
        payload += json.dumps({"done": unit, "rows": len(rows)}) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.done[unit] = len(rows)


def read_header(path: str | Path) -> dict[str, Any]:
    """The header (config and model identity) of a store."""
    path = Path(path)
    if not path.is_file():
        raise FlipscopeError(f"store {str(path)!r} does not exist; expected the results.jsonl of a flipscope run")
    for _, _, record in _lines(path):
        if record is None or record.get(_HEADER_KEY) != _FORMAT:
            raise FlipscopeError(f"{str(path)!r} is not a flipscope store (bad header line)")
        return record["header"]
    raise FlipscopeError(f"{str(path)!r} is empty")


def iter_units(path: str | Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(unit, its rows) for each finished unit, in file order, one unit in memory at a time (rows
    of a unit cut off mid-write are left out)."""
    pending: list[dict[str, Any]] = []
    for _, number, record in _lines(Path(path)):
        if number == 1:
            continue
        if record is None:
            break
        if "done" in record:
            yield record["done"], pending
            pending = []
        else:
            pending.append(record)


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of every finished unit, streamed: memory does not grow with the store."""
    for _, rows in iter_units(path):
        yield from rows


def read_units(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Finished unit → its rows, in file order."""
    return dict(iter_units(path))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of every finished unit (for pandas: `pandas.DataFrame(read_rows(path))`)."""
    return list(iter_rows(path))
