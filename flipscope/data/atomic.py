"""Files other runs read are replaced whole or not at all.

Every non-append write goes through `write_atomic`: the bytes go to a temporary file in the same
folder, are fsynced, and the temporary file is renamed over the target (atomic on POSIX), then the
folder is fsynced so the rename survives a power cut. A kill or a full disk mid-write leaves the
previous file byte for byte, and never a half file: the temporary file is removed on any error.
The file gets the permissions a plain `open` would give it (an existing file's, else 0o666 less
the umask), not the temporary file's owner-only 0o600, so a shared results folder stays readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flipscope.errors import FlipscopeError

__all__ = ["file_sha256", "folder_in_scratch", "write_atomic", "write_json"]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read a mebibyte at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """Permission bits for `path`: its own when it exists, else what `open` would create."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` by `data` (text is written as UTF-8) atomically; create its folder.

    Raises:
        FlipscopeError: the folder cannot be made or written (a file in the way, read-only, full disk);
            `path` is then unchanged.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise FlipscopeError(f"cannot write {str(path)!r}: {err.strerror or err}") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1, **dumps: Any) -> Path:
    """`write_atomic` of `obj` as strict JSON with one trailing newline (`dumps` go to
    `json.dumps`). A non-finite float (a statistic with no cases) is written as `null`, since
    `NaN` is not JSON and strict readers (jq, R, JavaScript) refuse the whole file; with
    `allow_nan=False` the write is refused instead, for files where one would be a bug."""
    refuse = dumps.pop("allow_nan", True) is False
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, **dumps)
    except ValueError as err:
        if refuse:
            raise FlipscopeError(f"{str(path)!r} would hold a non-finite number ({err}); nothing was written") from err
        text = json.dumps(_finite_or_null(obj), indent=indent, allow_nan=False, **dumps)
    return write_atomic(path, text + "\n")


def _finite_or_null(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (containers copied, the rest as is)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


@contextmanager
def folder_in_scratch(folder: str | Path) -> Iterator[Path]:
    """Build a whole folder in a scratch folder beside `folder` and rename it into place only when
    the block finishes, replacing any previous one: a reader never meets a half-built folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield scratch
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
