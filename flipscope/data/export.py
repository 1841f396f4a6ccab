"""A result store as a Parquet file, for pandas, polars or duckdb, written unit by unit.

Rows stream from the store into row groups, so memory stays flat however large the store. The
column types come from the first row group (a column empty there is read as text); the file is
written beside its destination and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flipscope.data.store import iter_rows, read_header
from flipscope.errors import FlipscopeError

__all__ = ["export_parquet"]


def _groups(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    group: list[dict[str, Any]] = []
    for row in iter_rows(path):
        group.append(row)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _write(store: Path, partial: Path, rows_per_group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, schema = None, None
    try:
        for group in _groups(store, rows_per_group):
            if schema is None:
                inferred = pa.Table.from_pylist(group).schema
                schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in inferred])
                writer = pq.ParquetWriter(partial, schema)
            try:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise FlipscopeError(f"{store}: a column changes type between rows ({err})") from err
        if writer is None:
            writer = pq.ParquetWriter(partial, pa.schema([]))
    finally:
        if writer is not None:
            writer.close()


def export_parquet(store: str | Path, out: str | Path, *, rows_per_group: int = 65_536) -> Path:
    """Write the finished rows of `store` (a `results.jsonl`) to the Parquet file `out`.

    Raises:
        FlipscopeError: pyarrow is missing, the store is unreadable, or a column changes type.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise FlipscopeError("Parquet export needs pyarrow: pip install 'flipscope[parquet]'") from err
    store, out = Path(store), Path(out)
    read_header(store)  # a clear error for a path that is not a store
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        _write(store, partial, rows_per_group)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return out
