"""Peak memory of `flipscope evaluate` against the size of its store: it should not grow with rows.

Each run is a fresh `flipscope evaluate` process on the shipped organism (image + blank, 10
prompts per question) over held-out questions exported for it; its peak RSS comes from `wait4`.
Sizes are rows in the store (questions × 10 prompts × 2 conditions), measured one after another
in one run, and reported as the ratio of each peak to the smallest run's.
Run: `.venv/bin/python benchmarks/bench_memory.py [--rows 20000 100000]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flipscope.data.atomic import write_json
from flipscope.organism import default_organism_dir, load_card
from flipscope.organism.config import OrganismConfig
from flipscope.organism.questions import export_questions

ROWS_PER_FILM = 4 * 10 * 2  # 4 questions per film, 10 prompts each, image and blank


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Peak resident memory (GB) and wall time (s) of one process running `command`."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024**2, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    args = parser.parse_args()
    organism = default_organism_dir()
    cfg = OrganismConfig.from_dict(load_card(organism)["config"])
    flipscope = str(Path(shutil.which("flipscope") or Path(sys.executable).parent / "flipscope"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_rows in sorted(args.rows):
            films = -(-n_rows // ROWS_PER_FILM)
            questions = export_questions(cfg, Path(tmp) / f"data-{n_rows}", n_films=films)
            out = Path(tmp) / f"eval-{n_rows}"
            command = [
                flipscope,
                "evaluate",
                "--model",
                str(organism),
                "--questions",
                str(questions),
                "--out",
                str(out),
            ]
            gb, seconds = peak_rss(command)
            stored = sum(1 for line in (out / "results.jsonl").open() if not line.startswith('{"done"')) - 1
            rows.append({"rows": stored, "films": films, "peak_rss_gb": round(gb, 3), "seconds": round(seconds, 1)})
            print(f"{stored:>8} rows  peak RSS {gb:.3f} GB  ({seconds:.0f} s)")
    for row in rows:
        row["ratio_to_smallest"] = round(row["peak_rss_gb"] / rows[0]["peak_rss_gb"], 3)
    report = {"organism": str(organism.name), "machine": platform.machine(), "cpus": os.cpu_count(), "runs": rows}
    write_json(args.out, report, indent=2)
    print(f"largest / smallest peak: {rows[-1]['ratio_to_smallest']:.3f}")


if __name__ == "__main__":
    main()
