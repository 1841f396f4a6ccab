"""Results written as they are computed, resumable after a crash at any point.

A store is one JSONL file. Line 1 is the header: the config and model identity that produced it.
Then, for each unit of work (e.g. a chunk of questions under one condition), its rows (one per
question × prompt × condition) followed by a marker line `{"done": unit, "rows": n}`, written
with one flushed and fsynced append per unit.

Everything after the last marker is a unit cut off mid-write: readers leave it out and a resumed
run drops it and recomputes the unit, ending with exactly the file an uninterrupted run writes.
Anything wrong *before* the last marker (a line that is not JSON, a marker whose row count does not
match, a unit written twice) is damage, never silently skipped: every reader raises an error that
names the line, and `repair_store` (`flipscope repair`) is the explicit, reported way to keep every
intact unit. While a run writes a store it holds an exclusive lock (`flipscope.data.lock`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flipscope.data.atomic import write_atomic
from flipscope.data.lock import StoreLock
from flipscope.errors import FlipscopeError

__all__ = [
    "ResultStore",
    "iter_rows",
    "iter_units",
    "read_header",
    "read_rows",
    "read_units",
    "repair_store",
    "store_text",
]

logger = logging.getLogger(__name__)

_HEADER_KEY = "flipscope_store"
_FORMAT = 1


def _header_line(header: dict[str, Any]) -> str:
    return json.dumps({_HEADER_KEY: _FORMAT, "header": header}) + "\n"


def store_text(header: dict[str, Any], units: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """A whole store's text (header, then each unit's rows and marker), for a store made in one
    step (an import) and written atomically rather than unit by unit."""
    body = "".join(
        "".join(json.dumps(row) + "\n" for row in rows) + json.dumps({"done": unit, "rows": len(rows)}) + "\n"
        for unit, rows in units.items()
    )
    return _header_line(header) + body


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A complete line's record, or None when the line is cut off, not JSON or not an object."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _is_marker(record: dict[str, Any]) -> bool:
    return "done" in record and isinstance(record.get("rows"), int) and isinstance(record["done"], str)


def _scan(path: Path) -> Iterator[tuple[int, int, bytes, dict[str, Any] | None]]:
    """(end offset, line number, raw bytes, record or None) of every line after the header."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            offset += len(raw)
            if number > 1:
                yield offset, number, raw, _parse(raw)


def _damage(path: Path, number: int, why: str) -> FlipscopeError:
    return FlipscopeError(
        f"store {str(path)!r} line {number} {why}, and finished units follow it; "
        f"`flipscope repair {path}` keeps every intact unit (the damaged ones are recomputed on the next run)"
    )


def _units(path: Path) -> Iterator[tuple[str, list[dict[str, Any]], int]]:
    """(unit, rows, end offset) of each finished unit, checking everything before the last marker.

    A bad line is only known to be damage (rather than the cut-off tail) once a marker follows it,
    so the lines after a bad one are read ahead until a marker or the end of the file.
    """
    pending: list[dict[str, Any]] = []
    seen: set[str] = set()
    bad: tuple[int, str] | None = None
    for offset, number, _, record in _scan(path):
        if record is None:
            bad = bad or (number, "is cut off or not a JSON object")
            continue
        if not _is_marker(record):
            pending.append(record)
            continue
        if bad is not None:
            raise _damage(path, *bad)
        if record["rows"] != len(pending):
            raise _damage(
                path,
                number,
                f"marks unit {record['done']!r} done with {record['rows']} rows, but {len(pending)} rows precede it",
            )
        if record["done"] in seen:
            raise _damage(path, number, f"marks unit {record['done']!r} done a second time")
        seen.add(record["done"])
        yield record["done"], pending, offset
        pending = []


def _differences(stored: Any, new: Any, prefix: str = "") -> str:
    """Where two headers differ, field by field; a short value (a digest, a name, a number) is
    shown as stored → now, so an edited questions file names both of its digests."""
    if isinstance(stored, dict) and isinstance(new, dict):
        keys = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
        return "; ".join(_differences(stored.get(k), new.get(k), f"{prefix}{k}.") for k in keys)
    name = prefix.rstrip(".")
    shown = [json.dumps(v) for v in (stored, new)]
    return f"{name}: {shown[0]} in the store, {shown[1]} now" if max(map(len, shown)) <= 80 else name


class ResultStore:
    """An append-only, resumable results file (format in the module docstring), locked while open."""

    def __init__(self, path: Path, header: dict[str, Any], done: dict[str, int], lock: StoreLock | None) -> None:
        self.path = path
        self.header = header
        self.done = done
        self._lock = lock

    @classmethod
    def open(cls, path: str | Path, header: dict[str, Any]) -> ResultStore:
        """Open `path` for `header`'s run: create it, or resume it if it holds the same run. The
        store stays locked against other writers until `close()` (or the process ends).

        Raises:
            FlipscopeError: another process writes the store (names it); the file holds a different
                run (names the first differing field) or is damaged (names the line).
        """
        path = Path(path)
        header = json.loads(json.dumps(header))  # as it reads back from disk
        if path.exists() and not path.is_file():
            raise FlipscopeError(f"store {str(path)!r} is not a file")
        lock = StoreLock.acquire(path)
        try:
            return cls(path, header, cls._resume(path, header), lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _resume(path: Path, header: dict[str, Any]) -> dict[str, int]:
        if not path.exists() or path.stat().st_size == 0:
            write_atomic(path, _header_line(header))
            return {}
        existing = read_header(path)
        if existing != header:
            raise FlipscopeError(
                f"store {str(path)!r} was written by a different run (differs in {_differences(existing, header)}); "
                "use another output directory or delete it"
            )
        done: dict[str, int] = {}
        with path.open("rb") as handle:
            keep = len(handle.readline())
        for unit, rows, offset in _units(path):
            done[unit], keep = len(rows), offset
        if keep < path.stat().st_size:
            logger.info("dropping an unfinished unit after byte %d of %s", keep, path)
            with path.open("r+b") as handle:
                handle.truncate(keep)
        return done

    def append(self, unit: str, rows: Sequence[dict[str, Any]]) -> None:
        """Write one unit's rows and its marker, durably."""
        if self._lock is None:
            raise FlipscopeError(f"store {str(self.path)!r} is closed")
        if unit in self.done:
            raise FlipscopeError(f"unit {unit!r} is already in {str(self.path)!r}")
        payload = "".join(json.dumps(row) + "\n" for row in rows)
        payload += json.dumps({"done": unit, "rows": len(rows)}) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self.done[unit] = len(rows)

    def close(self) -> None:
        """Release the lock; the store can still be read, not appended to."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_header(path: str | Path) -> dict[str, Any]:
    """The header (config and model identity) of a store."""
    path = Path(path)
    if not path.is_file():
        raise FlipscopeError(f"store {str(path)!r} does not exist; expected the results.jsonl of a flipscope run")
    with path.open("rb") as handle:
        first = handle.readline()
    if not first:
        raise FlipscopeError(f"{str(path)!r} is empty")
    record = _parse(first)
    if record is None or record.get(_HEADER_KEY) != _FORMAT or not isinstance(record.get("header"), dict):
        raise FlipscopeError(f"{str(path)!r} is not a flipscope store (bad header line)")
    return record["header"]


def iter_units(path: str | Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(unit, its rows) for each finished unit, in file order, one unit in memory at a time (rows
    of a unit cut off mid-write are left out; damage before the last marker raises, naming the line)."""
    read_header(path)
    for unit, rows, _ in _units(Path(path)):
        yield unit, rows


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


def repair_store(path: str | Path) -> dict[str, Any]:
    """Rewrite a damaged store with every intact unit (its rows all parse and its marker counts
    them; a unit written twice is kept once), keeping the damaged file beside it as `<name>.damaged`.
    A rerun of the command that wrote the store then computes only the dropped units.

    Returns:
        `{"kept": n units, "dropped": [line ranges of dropped units or lines], "backup": path}`.
    """
    path = Path(path)
    read_header(path)
    with StoreLock.acquire(path):
        kept: dict[str, list[bytes]] = {}
        dropped: list[str] = []
        pending: list[bytes] = []
        start, clean = 2, True
        for _, number, raw, record in _scan(path):
            if record is not None and _is_marker(record):
                unit = record["done"]
                if clean and record["rows"] == len(pending) and unit not in kept:
                    kept[unit] = [*pending, raw]
                else:
                    dropped.append(f"lines {start}-{number} (unit {unit!r})")
                pending, start, clean = [], number + 1, True
            elif record is None:
                clean = False
            else:
                pending.append(raw)
        if pending or not clean:
            dropped.append(f"lines {start}- (an unfinished unit)")
        backup = path.with_name(path.name + ".damaged")
        body = b"".join(line for lines in kept.values() for line in lines)
        write_atomic(backup, path.read_bytes())
        with path.open("rb") as handle:
            first = handle.readline()
        write_atomic(path, first + body)
    return {"kept": len(kept), "dropped": dropped, "backup": str(backup)}
