"""One store's work spread over the processes of a launch, and joined into one store.

Each process of a launch writes its shard under `<folder>/shards/K-of-N/` beside the store the run
would write alone. Under torch.distributed (torchrun, accelerate) every rank then waits for the
others at a barrier and rank 0 merges; an array task only writes its shard. Rerunning the command as
one process (no launcher) finishes whatever shards are unfinished and merges them, so a SLURM array
needs no extra step, and `flipscope merge FOLDER` does the same without a model.
"""

from __future__ import annotations

import atexit
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError
from flipscope.experiments.launch import Launch
from flipscope.experiments.shards import merge_shards

__all__ = ["SHARDS", "left_shards", "run_sharded", "shard_path"]

SHARDS = "shards"
_NAME = re.compile(r"^(\d+)-of-(\d+)$")
JOIN_TIMEOUT = timedelta(days=3)  # the barrier waits for the slowest rank, however long its shard takes

Run = Callable[[tuple[int, int] | None, Path], Any]


def shard_path(final: Path, shard: tuple[int, int]) -> Path:
    """Where shard K of N of the store `final` is written."""
    return final.parent / SHARDS / f"{shard[0]}-of-{shard[1]}" / final.name


def left_shards(final: Path) -> list[Path]:
    """The shard stores a launch left beside `final`: all N of them (those not yet started too), or none.

    Raises:
        FlipscopeError: shards of different launches (different N) are there.
    """
    folder = final.parent / SHARDS
    found = sorted(p.name for p in folder.iterdir() if _NAME.match(p.name)) if folder.is_dir() else []
    counts = {int(_NAME.match(name).group(2)) for name in found}  # type: ignore[union-attr]
    if len(counts) > 1:
        raise FlipscopeError(f"{str(folder)!r} holds shards of launches of different sizes {sorted(counts)}; keep one")
    if not counts:
        return []
    n = counts.pop()
    return [shard_path(final, (k, n)) for k in range(n)]


def _group() -> Any:
    """torch.distributed, with the process group this launch's rendezvous describes (gloo: the
    ranks only wait for each other and pass a message, whatever device they compute on)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=JOIN_TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist


def _join(paths: list[Path], final: Path, launch: Launch) -> None:
    """Every rank waits for the others; rank 0 merges; all ranks learn whether it could."""
    dist = _group()
    dist.barrier()
    error = None
    if launch.is_main:
        try:
            merge_shards(paths, final)
        except FlipscopeError as err:
            error = str(err)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise FlipscopeError(box[0] if launch.is_main else f"rank 0 could not merge the shards: {box[0]}")


def run_sharded(run: Run, final: Path, launch: Launch | None, *, manual_in_place: bool = True) -> Path | None:
    """Do `run(shard, store_path)` for this process's part of the store `final`.

    Returns `final` once it holds the whole run (one process, or any rank of a torch.distributed
    launch after rank 0 merged), None when only this process's shard was written (an array task,
    or `--shard K/N` by hand, whose store is `final` itself when `manual_in_place`, else under
    shards/ as a launch writes it).
    """
    final = Path(final)
    if launch is None:
        paths = left_shards(final)
        if not paths:
            run(None, final)
            return final
        for k, path in enumerate(paths):
            run((k, len(paths)), path)
        merge_shards(paths, final)
        return final
    if launch.launcher == "manual" and manual_in_place:
        run(launch.shard, final)
        return None
    run(launch.shard, shard_path(final, launch.shard))
    if not launch.distributed:
        return None
    _join([shard_path(final, (k, launch.world)) for k in range(launch.world)], final, launch)
    return final
