"""Where this process sits in a multi-process job, read from the launcher's environment.

One shard per GPU or array task needs no hand-written `--shard K/N`: torchrun and accelerate set
`RANK`/`WORLD_SIZE`/`LOCAL_RANK`, a SLURM array `SLURM_ARRAY_TASK_ID`/`SLURM_ARRAY_TASK_COUNT`, and
`srun` tasks `SLURM_PROCID`/`SLURM_NTASKS`. A process with a torch.distributed rendezvous
(`MASTER_ADDR`/`MASTER_PORT`, as torchrun sets) can also wait for the others and merge; an array task
cannot, and its shard is joined later by `flipscope merge` or by rerunning the command without the array.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from flipscope.errors import FlipscopeError

__all__ = ["Launch", "detect_launch", "parse_shard", "resolve_shard"]

LAUNCHER_VARIABLES = (
    "RANK/WORLD_SIZE (torchrun, accelerate), SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or SLURM_PROCID/SLURM_NTASKS"
)


@dataclass(frozen=True)
class Launch:
    """This process's shard of a job.

    Attributes:
        rank: Shard index K, 0 ≤ K < world.
        world: Number of shards N.
        launcher: "torchrun", "slurm-array", "slurm-tasks" or "manual" (`--shard K/N`).
        local_rank: GPU index on this node (`LOCAL_RANK`, `SLURM_LOCALID`), if the launcher gives one.
        distributed: A torch.distributed rendezvous is set up, so rank 0 can wait for the others and merge.
    """

    rank: int
    world: int
    launcher: str
    local_rank: int | None = None
    distributed: bool = False

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    @property
    def is_main(self) -> bool:
        """The process that writes what the whole job reports (rank 0, or the only one)."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """`cuda` pinned to this process's own GPU (`cuda:LOCAL_RANK`); any other device as given."""
        if device == "cuda" and self.local_rank is not None:
            return f"cuda:{self.local_rank}"
        return device


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise FlipscopeError(f"environment variable {name} is not set; the launcher sets it with the others")
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise FlipscopeError(f"environment variable {name}={raw!r} is not an integer") from err


def _checked(launch: Launch, names: str) -> Launch:
    if launch.world < 1 or not 0 <= launch.rank < launch.world:
        raise FlipscopeError(f"{names}: shard {launch.rank} of {launch.world} is not 0 <= K < N")
    return launch


def detect_launch(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, from torchrun/accelerate first, then a SLURM array
    (times the `srun` tasks of each array task), then `srun` tasks; None outside any launcher."""
    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK") or env.get("SLURM_LOCALID")
    local_rank = int(local) if local and local.isdigit() else None
    if "RANK" in env or "WORLD_SIZE" in env:
        launch = Launch(
            rank=_int(env, "RANK"),
            world=_int(env, "WORLD_SIZE"),
            launcher="torchrun",
            local_rank=local_rank,
            distributed=bool(env.get("MASTER_ADDR") and env.get("MASTER_PORT")),
        )
        return _checked(launch, "RANK/WORLD_SIZE")
    tasks, proc = _int(env, "SLURM_NTASKS", 1), _int(env, "SLURM_PROCID", 0)
    if "SLURM_ARRAY_TASK_ID" in env:
        step = _int(env, "SLURM_ARRAY_TASK_STEP", 1)
        index, rest = divmod(_int(env, "SLURM_ARRAY_TASK_ID") - _int(env, "SLURM_ARRAY_TASK_MIN", 0), step)
        if rest:
            raise FlipscopeError("SLURM_ARRAY_TASK_ID is not on the array's SLURM_ARRAY_TASK_MIN + k * STEP grid")
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        launch = Launch(rank=index * tasks + proc, world=count * tasks, launcher="slurm-array", local_rank=local_rank)
        return _checked(launch, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    if "SLURM_PROCID" in env and tasks > 1:
        return _checked(Launch(rank=proc, world=tasks, launcher="slurm-tasks", local_rank=local_rank), "SLURM_PROCID")
    return None


def parse_shard(text: str) -> tuple[int, int]:
    """`"K/N"` → (K, N) with 0 ≤ K < N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise FlipscopeError(f"--shard {text!r} is not K/N (e.g. 0/4), auto or none") from err
    if not 0 <= k < n:
        raise FlipscopeError(f"--shard {text!r}: expected 0 <= K < N")
    return k, n


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> Launch | None:
    """What `--shard` means here: `K/N` by hand, `auto` from the launcher (an error outside one),
    `none` this process does everything; unset is `auto` under a launcher of more than one process."""
    if option is None or option == "auto":
        launch = detect_launch(env)
        if launch is None and option == "auto":
            raise FlipscopeError(f"--shard auto: no launcher found; expected {LAUNCHER_VARIABLES} in the environment")
        return launch if launch is not None and launch.world > 1 else None
    if option == "none":
        return None
    k, n = parse_shard(option)
    return Launch(rank=k, world=n, launcher="manual")
