"""Comparing a run with its recorded values the way the suite's rule for numbers says
(tests/README.md): discrete outcomes equal, floats within a stated tolerance, a ranking's order
only where the recorded scores are further apart than that tolerance, an outcome decided within the
tolerance of its threshold either way, and a decimal printed in a sentence within one unit of its
last place.

float32 results are not bitwise portable: another CPU's kernels, SIMD width or thread count sum
in another order, and the demo's floats then differ by up to ~2.4e-5 (measured on an AVX512
machine against this suite's recording). The tolerance below leaves 40× room for that and is
still far below any difference the tests are about (one flip moves a flip rate by 1/160)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ATOL", "RTOL", "RANKED", "demo_values", "mismatches"]

ATOL = 1e-3
RTOL = 1e-3
# ranked tables of the demo's summary: where they are, and the score they are ranked by
RANKED = {
    "summary.discovery.top": "framing_share",
    "summary.discovery.diffmean_top_features": "cosine",
    "summary.site.entry.top": "framing_share",
}
# where a record names a direction by the sha256 of its float32 bytes: equal on one machine only
_DIGESTS_UNDER = ("ablate_direction", "ablate_heads")
# what a run records that is not a result: where it ran, how long it took, which files it wrote
# (and, under "organism" and the site choice, the folders it was loaded from)
_VOLATILE = ("settings", "files", "figures", "png_skipped", "commands", "seconds", "paper")


def demo_values(out: Path) -> dict[str, Any]:
    """What a demo run in `out` found: its summary (less paths and timings), every with-image and
    blank answer and margin of the evaluation, and the FlipBank's cases."""
    from flipscope.data.store import read_rows

    summary = json.loads((out / "summary.json").read_text())
    work = out / "work"
    rows = read_rows(work / "evaluation" / "results.jsonl")
    bank = json.loads((work / "flipbank.json").read_text())
    case_fields = ("id", "direction", "strategy", "original_answer", "paraphrase_answer",
                   "original_margin", "paraphrase_margin")  # fmt: skip
    kept = {k: v for k, v in summary.items() if k not in _VOLATILE}
    kept["organism"] = {k: v for k, v in summary["organism"].items() if k != "directory"}
    if (kept.get("site") or {}).get("choice"):  # the SAEs' folders: where the organism was loaded from
        choice = dict(kept["site"]["choice"])
        for key in ("chosen", "mid_depth"):
            if choice.get(key):
                choice[key] = {k: v for k, v in choice[key].items() if k not in ("source", "label")}
        kept["site"] = {**kept["site"], "choice": choice}
    return {
        "summary": kept,
        "evaluation": {
            "keys": [f"{r['question_id']}/p{r['prompt_index']}/{r['condition']}" for r in rows],
            "answers": "".join(r["answer"][0] for r in rows),
            "margins": [r["margin"] for r in rows],
        },
        "flipbank": {kind: [{k: c.get(k) for k in case_fields} for c in bank[kind]] for kind in ("flips", "controls")},
    }


def _close(actual: float, expected: float) -> bool:
    """Within the tolerance; a recorded NaN (a statistic with no cases) must come back NaN."""
    if math.isnan(expected):
        return math.isnan(actual)
    return math.isfinite(actual) and abs(actual - expected) <= ATOL + RTOL * abs(expected)


def _answers(actual: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> list[str]:
    """Answers equal, except where the recorded margin is within the tolerance of 0 (then either
    answer is the same result)."""
    if actual["keys"] != expected["keys"]:
        return [f"{where}.keys: the evaluation's prompts differ"]
    problems = mismatches(actual["margins"], expected["margins"], where=f"{where}.margins")
    rows = zip(expected["keys"], actual["answers"], expected["answers"], expected["margins"], strict=True)
    flipped = [key for key, a, e, m in rows if a != e and abs(m) > ATOL]
    return problems + ([f"{where}.answers: {len(flipped)} differ, e.g. {flipped[:5]}"] if flipped else [])


_DECIMAL = re.compile(r"[-−]?\d+\.\d+")


def _same_text(actual: str, expected: str) -> bool:
    """Equal, or equal but for decimals printed in the text, each within one unit of its last
    printed place of the recorded one (a float rounded for print: near a rounding boundary either
    rounding is the same result). Integers (feature ids, counts) must be equal."""
    if actual == expected:
        return True
    if _DECIMAL.sub("#", actual) != _DECIMAL.sub("#", expected):
        return False
    for a, e in zip(_DECIMAL.findall(actual), _DECIMAL.findall(expected), strict=True):
        unit = 10.0 ** -len(e.split(".")[1])
        if len(a.split(".")[1]) != len(e.split(".")[1]) or abs(_number(a) - _number(e)) > unit * 1.001:
            return False
    return True


def _number(text: str) -> float:
    return float(text.replace("−", "-"))


def _decision(actual: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> list[str]:
    """An effect judged against its random directions (`moves`: |value| beyond the null and the
    interval clear of 0): the verdict equal, except where a recorded number it was decided by sits
    within the tolerance of its threshold (then either verdict is the same result)."""
    e = expected["effect"]
    near = e is not None and min(abs(abs(e["value"]) - expected["null"]), abs(e["low"]), abs(e["high"])) <= ATOL
    rest = {k: v for k, v in expected.items() if k != "moves"}
    got = {k: v for k, v in actual.items() if k != "moves"} if isinstance(actual, Mapping) else actual
    problems = mismatches(got, rest, where)
    if isinstance(actual, Mapping) and actual.get("moves") != expected["moves"] and not near:
        problems.append(f"{where}.moves: {actual.get('moves')!r}, recorded {expected['moves']!r}")
    return problems


def _ranked(actual: list[Any], expected: list[Any], where: str, score: str) -> list[str]:
    """A ranked table: at each place the recorded feature, or one whose recorded score ties with it
    within the tolerance; then each feature's record compared with its recorded one."""
    if len(actual) != len(expected):
        return [f"{where}: {len(actual)} entries, recorded {len(expected)}"]
    problems = []
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        tied = {x["feature"] for x in expected if abs(x[score] - e[score]) <= ATOL + RTOL * abs(e[score])}
        if a["feature"] not in tied:
            problems.append(f"{where}[{i}]: feature {a['feature']}, recorded {e['feature']} (ties: {sorted(tied)})")
    recorded = {e["feature"]: e for e in expected}
    for a in actual:
        if a["feature"] in recorded:
            problems += mismatches(a, recorded[a["feature"]], where=f"{where}[feature {a['feature']}]")
    return problems


def mismatches(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Every place where `actual` departs from `expected` beyond the rule, as `path: what`."""
    if where in RANKED and isinstance(expected, list):
        return _ranked(actual, expected, where, RANKED[where])
    if isinstance(expected, Mapping) and set(expected) == {"keys", "answers", "margins"}:
        return _answers(actual, expected, where)
    if isinstance(expected, Mapping) and {"moves", "effect", "null"} <= set(expected):
        return _decision(actual, expected, where)
    if isinstance(expected, str) and isinstance(actual, str):
        return [] if _same_text(actual, expected) else [f"{where}: {actual!r}, recorded {expected!r}"]
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return [] if actual == expected else [f"{where}: {actual!r}, recorded {expected!r}"]
    if isinstance(expected, int | float):
        if isinstance(actual, bool) or not isinstance(actual, int | float):
            return [f"{where}: {actual!r}, recorded {expected!r}"]
        if isinstance(expected, int) and isinstance(actual, int):
            return [] if actual == expected else [f"{where}: {actual}, recorded {expected}"]
        return [] if _close(actual, expected) else [f"{where}: {actual!r}, recorded {expected!r}"]
    if isinstance(expected, Mapping):
        if where.endswith(_DIGESTS_UNDER) and "sha256" in expected:  # a digest of float bytes: same machine only
            expected = {k: v for k, v in expected.items() if k != "sha256"}
            actual = {k: v for k, v in actual.items() if k != "sha256"} if isinstance(actual, Mapping) else actual
        if not isinstance(actual, Mapping) or set(actual) != set(expected):
            keys = set(actual) ^ set(expected) if isinstance(actual, Mapping) else "not a mapping"
            return [f"{where}: keys differ: {keys}"]
        return [p for k in expected for p in mismatches(actual[k], expected[k], f"{where}.{k}" if where else str(k))]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            n = len(actual) if isinstance(actual, list) else actual
            return [f"{where}: {n!r} entries, recorded {len(expected)}"]
        pairs = enumerate(zip(actual, expected, strict=True))
        return [p for i, (a, e) in pairs for p in mismatches(a, e, f"{where}[{i}]")]
    raise TypeError(f"{where}: cannot compare a {type(expected).__name__}")
