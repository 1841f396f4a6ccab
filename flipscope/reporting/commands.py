"""The CLI commands that print each number of a demo run's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["demo_commands", "evaluation_commands"]


def demo_commands(
    organism: Path,
    questions: Path,
    work: Path,
    bank: Path,
    chosen: list[int],
    planted: list[int],
    feature: int,
    cfg: Any,
    counted: dict[str, list[int] | None] | None = None,
    trace: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The CLI commands that print each of the report's numbers (rerunning them on `work` resumes
    the demo's own stores, so they compute nothing twice); `counted`: the features each site's
    count removed (`main`, and `entry` where the demo read the trace's site); `trace`: the demo's
    trace summary (the layers it traced, and under `heads` the heads it named, which the demo
    switched off beside the clamps)."""

    from flipscope.organism import default_organism_dir

    m = "" if Path(organism) == default_organism_dir() else f" --model {organism}"  # the default needs none
    conditions = ",".join(cfg.conditions)
    values = ",".join(f"{v:g}" for v in cfg.clamp_values)
    trace = trace or {}
    heads = ",".join(f"{c['layer']}.{c['head']}" for c in trace.get("heads", {}).get("carriers") or [])
    traced = f" --layers {_ints(trace['layers'])}" if cfg.layer_stride > 1 and trace.get("layers") else ""
    return {
        **evaluation_commands(organism, questions, work, cfg),
        "discover": f"flipscope discover{m} --flipbank {bank} --out {work / 'discovery-cli.json'}",
        "patch_discovered": f"flipscope patch{m} --flipbank {bank} --features {_ints(chosen)} "
        f"--out {work / 'patch-discovered'}",
        **(
            {
                "patch_planted": f"flipscope patch{m} --flipbank {bank} --features {_ints(planted)} "
                f"--out {work / 'patch-planted'}"
            }
            if planted
            else {}
        ),  # fmt: skip
        "patch_single": f"flipscope patch{m} --flipbank {bank} --features {feature} --out {work / 'patch-single'}",
        "trace": f"flipscope trace{m} --flipbank {bank}{traced} --max-cases {cfg.trace_cases} --heads "
        f"--out {work / 'trace-cli.json'}",
        "site": f"flipscope discover{m} --flipbank {bank} --sae auto --trace {work / 'trace.json'} --exact-top 0 "
        f"--layers 0 --out {work / 'site-cli.json'}",
        "clamp": f"flipscope clamp{m} --questions {questions} --features {feature} --values {values} "
        f"--diffmean-from {bank}{f' --ablate-heads {heads}' if heads else ''} --conditions {conditions} "
        f"--out {work / 'clamp'}",
        **_count_commands(m, bank, work, counted or {}),
    }


def _ints(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _count_commands(m: str, bank: Path, work: Path, counted: dict[str, list[int] | None]) -> dict[str, str]:
    """`patch --count` at the main SAE and, with `--sae auto`, at the site the demo's trace chose."""
    sites = {"count_main": ("main", ""), "count_entry": ("entry", f" --sae auto --trace {work / 'trace.json'}")}
    return {
        name: f"flipscope patch{m}{sae} --flipbank {bank} --features {_ints(counted[key])} --count "
        f"--no-wording-bound --out {work / name.replace('_', '-')}"
        for name, (key, sae) in sites.items()
        if counted.get(key)
    }


def evaluation_commands(organism: Path, questions: Path, work: Path, cfg: Any) -> dict[str, str]:
    """The commands that print the evaluation's numbers and curate its FlipBank (all a run with
    no flips has)."""
    conditions = ",".join(cfg.conditions)
    return {
        "evaluate": f"flipscope evaluate --model {organism} --questions {questions} --conditions {conditions} "
        f"--out {work / 'evaluation'}",
        "curate": f"flipscope curate --results {work / 'evaluation'} --questions {questions} --min-margin 0.2 "
        f"--out {work / 'flipbank-cli.json'}",
    }
