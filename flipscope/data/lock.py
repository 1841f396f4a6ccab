"""One writer per store: an exclusive lock held while a run appends to it; and one builder per
cached folder (`build_once`): a second process waits for the first and reuses what it built.

The lock is `fcntl.flock` on `<store>.lock`, which the kernel releases when its holder dies, so a
crashed or killed run never blocks the rerun. The lock file records the holder (PID, host, start
time, command line) so a second writer — two `evaluate` processes on one `--out`, a requeued SLURM
task beside the still-running original — is refused with the holder named. A lock file left by a
process that is gone is taken over, with a message that says so.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flipscope.data.atomic import folder_in_scratch
from flipscope.errors import FlipscopeError

__all__ = ["StoreLock", "build_lock", "build_once"]

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"PID {holder.get('pid')} on {holder.get('host')} (since {since}: {holder.get('command', '?')})"


def _open_lock(target: str | Path) -> tuple[Path, int]:
    """`<target>.lock` beside `target`, opened (created if need be) for locking."""
    path = Path(str(target) + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise FlipscopeError(f"cannot create the lock {str(path)!r}: {err.strerror or err}") from err


class StoreLock:
    """An acquired lock; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, store: str | Path) -> StoreLock:
        """Lock `store` (via `<store>.lock` beside it) for this process.

        Raises:
            FlipscopeError: another live process holds it (named), or the lock file cannot be made.
        """
        path, fd = _open_lock(store)
        previous = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise FlipscopeError(
                f"{str(store)!r} is being written by {_describe(previous)}; wait for it to finish, "
                f"or stop it, or use another output directory (lock: {str(path)!r})"
            ) from err
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _alive(previous["pid"]):
            logger.warning("taking over the lock of %s: PID %s is no longer running", store, previous["pid"])
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@contextmanager
def build_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `<folder>.lock`, waiting while another process holds it. Two
    processes that would build the same cached folder (a converted GGUF, an assembled organism)
    then build it once: the second re-checks the folder after the wait and reuses it. The kernel
    releases the lock when its holder dies, so a killed build never blocks the next.

    Raises:
        FlipscopeError: the lock file cannot be made.
    """
    _, fd = _open_lock(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build_once(folder: str | Path, built: Callable[[], bool], build: Callable[[Path], None]) -> Path:
    """`folder`, made by `build(scratch)` unless `built()` already says it is there: built in a
    scratch folder renamed into place when whole (`folder_in_scratch`), under `build_lock`, and
    checked again after the wait, so a process that waited reuses what the other one built."""
    folder = Path(folder)
    if built():
        return folder
    with build_lock(folder):
        if not built():
            with folder_in_scratch(folder) as scratch:
                build(scratch)
    return folder
