"""Redraw the demo's figures from a finished run: the code `flipscope demo` draws them with.

Run: `.venv/bin/python analyses/figures.py [figures/summary.json] [--out figures] [--no-png]`.
Edit a figure in `flipscope/plots.py` (or restyle the ones returned here) and rerun; nothing is
recomputed, everything comes from the run's summary and the stores it names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flipscope.reporting.demo_figures import build_figures
from flipscope.reporting.files import save_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, nargs="?", default=Path("figures/summary.json"))
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default: beside the summary).")
    parser.add_argument("--no-png", action="store_true", help="HTML only.")
    args = parser.parse_args()
    if not args.summary.is_file():
        parser.error(f"{args.summary} does not exist; run `make demo` (or `flipscope demo`) first")
    summary = json.loads(args.summary.read_text())
    figures = build_figures(summary)
    written = save_figures(figures, args.out or args.summary.parent, {"demo": summary["settings"]}, png=not args.no_png)
    for path in written["html"] + written["png"]:
        print(path)
    if written["png_skipped"]:
        print(f"PNGs skipped: {written['png_skipped']}")


if __name__ == "__main__":
    main()
