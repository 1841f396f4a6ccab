"""Joining the stores of one run's shards into the store one process would have written,
streamed unit by unit so memory does not grow with the run.

Evaluations shard by question chunk, patch and layer sweeps by case chunk: unit `i` of the run
belongs to shard `i mod N` either way."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flipscope.data.store import ResultStore, iter_units, read_header
from flipscope.errors import FlipscopeError
from flipscope.experiments.evaluation import unit_key, unit_order

__all__ = ["header_differences", "merge_shards", "run_plan"]


def header_differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two store headers differ, as `field: A vs B` (nested fields dotted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found: list[str] = []
        for key in sorted(set(a) | set(b)):
            found += header_differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return found
    return [] if a == b else [f"{where or 'header'}: {a!r} vs {b!r}"]


def run_plan(header: dict[str, Any]) -> list[tuple[str, int]]:
    """Every unit of the run a store's header describes, as (unit, chunk index), in the order a
    single process writes them; the unit's shard is its chunk index mod N."""
    if header.get("kind") == "flip-evaluation":
        cfg = header["eval_config"]
        order = unit_order(cfg["conditions"], header["questions"]["n"], cfg["questions_per_unit"])
        return [(unit_key(c, i), i) for c, i in order]
    if header.get("kind") in ("patch-sweep", "layer-sweep"):
        chunks = -(-int(header["n_cases"]) // int(header["cases_per_unit"]))
        return [(f"cases/{k}", k) for k in range(chunks)]
    raise FlipscopeError(f"a store of kind {header.get('kind')!r} cannot be merged from shards")


def _shard_headers(paths: Sequence[str | Path]) -> tuple[dict[str, Any], dict[int, Path]]:
    """The run's header and shard index → store path, after checking the stores are the N shards of one run."""
    headers = [read_header(p) for p in paths]
    base = {k: v for k, v in headers[0].items() if k != "shard"}
    owners: dict[int, Path] = {}
    for path, header in zip(paths, headers, strict=True):
        if header.get("shard") is None:
            raise FlipscopeError(f"{str(path)!r} is not a shard (no shard in its header)")
        differ = header_differences({k: v for k, v in header.items() if k != "shard"}, base)
        if differ:
            raise FlipscopeError(
                f"{str(path)!r} was started with other options than {str(paths[0])!r}, so they are not shards of "
                f"one run: {'; '.join(differ[:4])}"
            )
        owners[int(header["shard"][0])] = Path(path)
    shards = sorted(tuple(h["shard"]) for h in headers)
    n = shards[0][1]
    if shards != [(k, n) for k in range(n)]:
        raise FlipscopeError(f"shards {shards} are not exactly 0/{n} .. {n - 1}/{n}")
    merged = {k: (None if k == "shard" else v) for k, v in headers[0].items()}
    if merged.get("kind") != "flip-evaluation":  # a sweep's unsharded header has no shard field
        del merged["shard"]
    return merged, owners


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
    """Join the stores of shards 0..N-1 of one run (an evaluation or a patch/layer sweep) into
    the store one process would have written.

    Raises:
        FlipscopeError: the stores are not all shards of one run (the differing options named), a
            shard is missing or unfinished.
    """
    header, owners = _shard_headers(paths)
    plan = run_plan(header)
    n = len(owners)
    done = {path: {unit for unit, _ in iter_units(path)} for path in owners.values()}
    missing = [unit for unit, i in plan if unit not in done[owners[i % n]]]
    if missing:
        raise FlipscopeError(f"{len(missing)} unit(s) unfinished in the shards (e.g. {missing[0]}); rerun them first")
    merged = ResultStore.open(out, header)
    readers = {k: _UnitReader(path) for k, path in owners.items()}
    with merged:
        for unit, index in plan:
            rows = readers[index % n].take(unit)
            if unit not in merged.done:
                merged.append(unit, rows)
    return merged
