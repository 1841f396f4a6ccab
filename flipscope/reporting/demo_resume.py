"""Resuming the demo: each finished stage's results, read back on a rerun.

The demo's stages share their results in one dictionary (`run.found`). After a stage finishes,
what it added there is pickled to `work/stages/NN-<stage>.pkl` (atomically), with what it was
computed from: the organism (the model's and SAE's weights, its card), the demo's settings,
flipscope's own code and the libraries' versions, the folder itself (the results name paths in
it, so a moved folder runs again), the record of the stage before it (a hash chain: a stage that
ran again to another result makes every later one run again) and the sha256 of each file the
stage wrote under `work`. On a rerun a stage is read back only while all of these hold; else it
runs again, and its own stores resume where they stopped. So a demo that died in its last stage
loses none of the stages before it, and a changed setting, organism or line of code recomputes.
Each record also keeps the seconds its stage took, so a rerun's summary can say what it saved.

The records are pickles: read only `work` folders your own runs wrote.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from flipscope.data.atomic import file_sha256, write_atomic
from flipscope.sae.load import sae_digest

__all__ = ["StageRecords", "demo_inputs"]

FOLDER = "stages"
VERSIONS = ("torch", "transformers", "sae-lens", "numpy", "scipy", "pandas")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_digest() -> str:
    """sha256 over flipscope's own source files (paths and bytes): a record made by other code is stale."""
    root = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def demo_inputs(vlm: Any, sae: Any, card: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """What every stage of a demo run is computed from: the model's identity, the SAE's weights,
    the organism's card, the settings, flipscope's code and the libraries' versions."""
    return {
        "model": vlm.identity(),
        "sae": sae_digest(sae),
        "card": card,
        "settings": asdict(cfg),
        "code": code_digest(),
        "versions": {name: _version(name) for name in VERSIONS},
    }


def _files(work: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `work` but the records' folder, by relative path."""
    if not work.is_dir():
        return {}
    out = {}
    for path in work.rglob("*"):
        rel = path.relative_to(work)
        if path.is_file() and rel.parts[0] != FOLDER:
            stat = path.stat()
            out[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return out


class StageRecords:
    """The demo's finished stages under `work/stages`, chained from `inputs` (`demo_inputs`)."""

    def __init__(self, work: Path, inputs: Mapping[str, Any]) -> None:
        self.work = Path(work)
        seed = {**inputs, "work": str(self.work.resolve())}  # results hold paths under it: a moved folder reruns
        self.chain = _sha(json.dumps(seed, sort_keys=True, default=str).encode())
        self.seconds: dict[int, float | None] = {}

    def path(self, k: int, stage: Callable[..., Any]) -> Path:
        return self.work / FOLDER / f"{k:02d}-{stage.__name__.strip('_')}.pkl"

    def _intact(self, record: Mapping[str, Any]) -> bool:
        """Whether `record` was made after this chain, and every file its stage wrote is as it left it."""
        if record.get("chain") != self.chain:
            return False
        for rel, sha in record["files"].items():
            path = self.work / rel
            if not path.is_file() or file_sha256(path) != sha:
                return False
        return True

    def run(self, k: int, stage: Callable[[Any], None], run: Any) -> bool:
        """Stage `k`: its results read back into `run.found` when its record holds (True), else
        the stage run and its record written (False). `self.seconds[k]` is what computing it took.

        The file holds the results' own pickle beside the seconds, and the chain follows those
        bytes alone: a stage that reruns to the same results in another time keeps later records valid."""
        path = self.path(k, stage)
        try:
            outer = pickle.loads(path.read_bytes())
            blob, seconds = outer["result"], outer["seconds"]
            record = pickle.loads(blob)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError,
                KeyError):  # fmt: skip
            record = None
        read_back = isinstance(record, dict) and self._intact(record)
        if read_back:
            run.found.update(record["found"])
        else:
            before, found, start = _files(self.work), dict(run.found), time.perf_counter()
            stage(run)
            seconds = round(time.perf_counter() - start, 2)
            after = _files(self.work)
            written = {rel: file_sha256(self.work / rel) for rel, stat in after.items() if before.get(rel) != stat}
            added = {key: value for key, value in run.found.items() if key not in found or found[key] is not value}
            blob = pickle.dumps(
                {"chain": self.chain, "files": written, "found": added}, protocol=pickle.HIGHEST_PROTOCOL
            )
            write_atomic(path, pickle.dumps({"result": blob, "seconds": seconds}, protocol=pickle.HIGHEST_PROTOCOL))
        self.seconds[k] = seconds
        self.chain = _sha((self.chain + _sha(blob)).encode())
        return read_back
