"""Joining the stores of one evaluation's shards into the store one process would have written,
streamed unit by unit so memory does not grow with the run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flipscope.data.store import ResultStore, iter_units, read_header
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import unit_key, unit_order

__all__ = ["merge_shards"]


def _shard_headers(paths: Sequence[str | Path]) -> tuple[dict[str, Any], dict[int, Path]]:
    """The run's header and shard index → store path, after checking the stores are the N shards of one run."""
    headers = [read_header(p) for p in paths]
    base = {k: v for k, v in headers[0].items() if k != "shard"}
    owners: dict[int, Path] = {}
    for path, header in zip(paths, headers, strict=True):
        if {k: v for k, v in header.items() if k != "shard"} != base:
            raise FlipscopeError(f"{str(path)!r} is not a shard of the same run as {str(paths[0])!r}")
        if header.get("shard") is None:
            raise FlipscopeError(f"{str(path)!r} is not a shard (no shard in its header)")
        owners[int(header["shard"][0])] = Path(path)
    shards = sorted(tuple(h["shard"]) for h in headers)
    n = shards[0][1]
    if shards != [(k, n) for k in range(n)]:
        raise FlipscopeError(f"shards {shards} are not exactly 0/{n} .. {n - 1}/{n}")
    return {k: (None if k == "shard" else v) for k, v in headers[0].items()}, owners


class _UnitReader:
    """A shard's finished units in file order, read one at a time (ahead only if out of order)."""

    def __init__(self, path: Path) -> None:
        self._units: Iterator[tuple[str, list[dict[str, Any]]]] = iter_units(path)
        self._ahead: dict[str, list[dict[str, Any]]] = {}

    def take(self, unit: str) -> list[dict[str, Any]] | None:
        while unit not in self._ahead:
            found = next(self._units, None)
            if found is None:
                return None
            self._ahead[found[0]] = found[1]
        return self._ahead.pop(unit)


def merge_shards(paths: Sequence[str | Path], out: str | Path) -> ResultStore:
    """Join the stores of shards 0..N-1 of one run into the store one process would have written.

    Raises:
        FlipscopeError: the stores are not all shards of one run, a shard is missing or unfinished.
    """
    header, owners = _shard_headers(paths)
    cfg = header["eval_config"]
    order = unit_order(cfg["conditions"], header["questions"]["n"], cfg["questions_per_unit"])
    done = {path: {unit for unit, _ in iter_units(path)} for path in owners.values()}
    missing = [unit_key(c, i) for c, i in order if unit_key(c, i) not in done[owners[i % len(owners)]]]
    if missing:
        raise FlipscopeError(f"{len(missing)} unit(s) unfinished in the shards (e.g. {missing[0]}); rerun them first")
    merged = ResultStore.open(out, header)
    readers = {k: _UnitReader(path) for k, path in owners.items()}
    with merged:
        for condition, index in order:
            unit = unit_key(condition, index)
            rows = readers[index % len(owners)].take(unit)
            if unit not in merged.done:
                merged.append(unit, rows)
    return merged
