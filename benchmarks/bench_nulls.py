"""Cost of discovery's permutation nulls at GemmaScope 2's width: all permutations per matrix
product against one permutation at a time, side by side in one run.

Data: 160 flip–control pairs of Δf over 16,384 features (JumpReLU-like: mostly zeros, a few
hundred active per case), the shapes `discover` meets on MedGemma with `layer_17_width_16k`.
Both paths compute the same maxima (equal to 1e-12, checked here and in `tests/test_nulls.py`);
the per-permutation path runs on a subset of permutations and its time is scaled per permutation.
Run: `.venv/bin/python benchmarks/bench_nulls.py [--features 16384 --pairs 160 --perms 500]`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from flipscope.data.atomic import write_json
from flipscope.experiments.nulls import NULL_STATISTICS, _swapped_maxima, statistic
from flipscope.experiments.specificity import max_t_null, t_statistic


def sparse_deltas(rng: np.random.Generator, pairs: int, features: int, active: int = 300) -> np.ndarray:
    """Δf of `pairs` cases: `active` random features per case move, the rest stay 0."""
    out = np.zeros((pairs, features))
    for row in out:
        row[rng.choice(features, active, replace=False)] = rng.normal(0, 1, active)
    return out


def one_at_a_time(name, swaps, flip, control, shift_flip, shift_control) -> np.ndarray:
    return np.array(
        [statistic(name, np.where(w[:, None], control, flip), np.where(w[:, None], flip, control),
                   np.where(w, shift_control, shift_flip), np.where(w[:, None], control, flip)).max()
         for w in swaps]
    )  # fmt: skip


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--perms", type=int, default=500, help="permutations of the batched path")
    parser.add_argument("--loop-perms", type=int, default=20, help="permutations of the one-at-a-time path")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nulls.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    flip, control = sparse_deltas(rng, args.pairs, args.features), sparse_deltas(rng, args.pairs, args.features)
    shift_flip, shift_control = rng.normal(6, 1, args.pairs), rng.normal(0, 1, args.pairs)
    swaps = rng.random((args.perms, args.pairs)) < 0.5
    rows = {}
    for name in NULL_STATISTICS:
        batched, fast = timed(_swapped_maxima, name, swaps, flip, control, shift_flip, shift_control)
        few = swaps[: args.loop_perms]
        looped, slow = timed(one_at_a_time, name, few, flip, control, shift_flip, shift_control)
        assert np.allclose(fast[: args.loop_perms], slow, atol=1e-12), name
        per_fast, per_slow = batched / args.perms, looped / args.loop_perms
        rows[name] = {"batched_ms_per_perm": 1e3 * per_fast, "one_at_a_time_ms_per_perm": 1e3 * per_slow,
                      "speedup": per_slow / per_fast}  # fmt: skip
        print(f"{name:<12} {1e3 * per_fast:8.2f} ms/perm batched, {1e3 * per_slow:8.2f} one at a time: "
              f"{per_slow / per_fast:6.1f}x")  # fmt: skip
    signs = rng.choice(np.array([-1.0, 1.0]), size=(args.loop_perms, args.pairs))
    batched, _ = timed(lambda: max_t_null(control, n_perm=args.perms))
    looped, _ = timed(lambda: [np.abs(t_statistic(control * s[:, None])).max() for s in signs])
    per_fast, per_slow = batched / args.perms, looped / args.loop_perms
    rows["max_t"] = {"batched_ms_per_perm": 1e3 * per_fast, "one_at_a_time_ms_per_perm": 1e3 * per_slow,
                     "speedup": per_slow / per_fast}  # fmt: skip
    print(f"{'max |t|':<12} {1e3 * per_fast:8.2f} ms/perm batched, {1e3 * per_slow:8.2f} one at a time: "
          f"{per_slow / per_fast:6.1f}x")  # fmt: skip
    result = {"features": args.features, "pairs": args.pairs, "perms": args.perms, "machine": platform.machine(),
              "statistics": rows}  # fmt: skip
    write_json(args.out, result, indent=1)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
