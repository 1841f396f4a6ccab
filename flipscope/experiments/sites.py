"""Which SAE to read: among the dictionaries at hand, the one nearest where the framing enters the answer.

The trace (`flipscope.experiments.upstream.trace_framing`) names the first layer E whose input
carries at least half of the framing's effect at the last prompt position, by the lower end of its
CI over the traced flips (`entry_layer`). Only
attention moves information between positions, so the wording reached the answer position
through layer E−1's attention (`blocks.{E-1}.hook_attn_out`); with E = 0 it was there from the
embedding (`blocks.0.hook_resid_pre`). An SAE at that site, or just after it, reads the framing
while it is still wording; further down the same change has become the answer, and features there
recover less of the margin (on the organism: 0.57 at `blocks.0.hook_attn_out`, 0.20 at
`blocks.2.hook_resid_post`).

Sites are ordered along the residual stream of each layer L:

    resid_pre(L) < attn.hook_z(L) ≤ attn_out(L) < resid_mid(L) < mlp_out(L) < resid_post(L) = resid_pre(L+1)

`choose_site` takes the first candidate at or after the entry site; with none there, the last one
before it, and says that the framing has not reached the answer position there. The paper's site
(mid-depth: `blocks.{n_layers // 2}.hook_resid_post`, layer 17 of MedGemma's 34) is named beside
it when a candidate sits there, so a report can show both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flipscope.data.jsonfile import read_json_object
from flipscope.errors import FlipscopeError
from flipscope.model.hook_names import GEMMASCOPE_SITES

__all__ = [
    "SiteCandidate",
    "SiteChoice",
    "choose_site",
    "entry_site",
    "folder_candidates",
    "release_candidates",
    "site_position",
]

_HOOK = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|attn\.hook_z|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post)$"
)
_OFFSET = {
    "hook_resid_pre": 0.0,
    "attn.hook_z": 1.0,
    "hook_attn_out": 1.5,
    "hook_resid_mid": 2.0,
    "hook_mlp_out": 3.0,
    "hook_resid_post": 4.0,
}


def site_position(hook: str) -> float:
    """Where `hook` reads the residual stream of the language model, in quarter layers:
    `blocks.L.hook_resid_post` and `blocks.{L+1}.hook_resid_pre` are the same point.

    Raises:
        FlipscopeError: not a decoder-layer hook name.
    """
    match = _HOOK.match(hook)
    if match is None:
        raise FlipscopeError(
            f"{hook!r} is not a decoder-layer site; expected blocks.L.<hook_resid_pre | attn.hook_z | "
            "hook_attn_out | hook_resid_mid | hook_mlp_out | hook_resid_post>"
        )
    return 4.0 * int(match.group(1)) + _OFFSET[match.group(2)]


def entry_site(entry_layer: int) -> str:
    """The hook where the framing reaches the answer position, from the trace's `entry_layer`."""
    if entry_layer < 0:
        raise FlipscopeError(f"entry layer {entry_layer} is negative")
    return "blocks.0.hook_resid_pre" if entry_layer == 0 else f"blocks.{entry_layer - 1}.hook_attn_out"


@dataclass(frozen=True)
class SiteCandidate:
    """One SAE that could be read.

    Attributes:
        hook: Its hook name.
        source: A folder `load_sae` reads, or a sae-lens release (with `sae_id`).
        sae_id: The id within a release; None for a folder.
    """

    hook: str
    source: str
    sae_id: str | None = None

    @property
    def label(self) -> str:
        return self.source if self.sae_id is None else f"{self.source} / {self.sae_id}"


def _folder_hook(folder: Path) -> str | None:
    """The hook of the SAE in `folder` from its config alone (no weights read), or None."""
    cfg_path = folder / "cfg.json"
    if cfg_path.is_file():
        cfg = read_json_object(cfg_path, "SAE config")
        hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
        if not isinstance(hook, str):
            raise FlipscopeError(f"{str(cfg_path)!r} names no hook (metadata.hook_name)")
        return hook
    if (folder / "params.safetensors").is_file():  # a raw GemmaScope 2 folder: .../resid_post/layer_L_...
        layer = re.search(r"layer_(\d+)", folder.name)
        site = next((w for w in GEMMASCOPE_SITES if w in str(folder)), None)
        if layer and site:
            return f"blocks.{layer.group(1)}.{GEMMASCOPE_SITES[site]}"
    return None


def folder_candidates(folder: str | Path) -> list[SiteCandidate]:
    """The SAEs in `folder` and in its subfolders up to two levels down (an organism's `sae/` and
    `sae_entry/`, or a GemmaScope 2 download's `resid_post/layer_17_.../`), with their hooks.

    Raises:
        FlipscopeError: the folder does not exist, or holds no SAE.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FlipscopeError(f"{str(root)!r} is not a folder of SAEs")
    found = []
    for path in [root, *sorted(p for p in (*root.glob("*"), *root.glob("*/*")) if p.is_dir())]:
        hook = _folder_hook(path)
        if hook is not None and _HOOK.match(hook):
            found.append(SiteCandidate(hook=hook, source=str(path)))
    if not found:
        raise FlipscopeError(
            f"{str(root)!r} holds no SAE at a decoder-layer site (cfg.json or params.safetensors, itself or up to "
            "two folders down)"
        )
    return found


def release_candidates(release: str) -> list[SiteCandidate]:
    """Every SAE of a sae-lens release (its directory lists ids and paths without downloading),
    with the hook sae-lens gives it; ids whose site cannot be read from the path are left out.

    Raises:
        FlipscopeError: sae-lens does not know the release.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        near = sorted(name for name in directory if release.split("-")[0] in name)[:8]
        raise FlipscopeError(f"sae-lens knows no release {release!r}" + (f" (e.g. {', '.join(near)})" if near else ""))
    found = []
    for sae_id, path in directory[release].saes_map.items():
        layer = re.search(r"layer_(\d+)", sae_id)
        site = next((w for w in GEMMASCOPE_SITES if path.startswith(w)), None)
        if layer is None or site is None or "transcoder" in path or "clt" in path:
            continue
        hook = f"blocks.{layer.group(1)}.{GEMMASCOPE_SITES[site]}"
        found.append(SiteCandidate(hook=hook, source=release, sae_id=sae_id))
    return found


@dataclass(frozen=True)
class SiteChoice:
    """The SAE `choose_site` picked, and why.

    Attributes:
        chosen: The candidate read.
        entry: The hook where the framing reaches the answer position (`entry_site`).
        entry_layer: The trace's entry layer.
        after_entry: Whether `chosen` sits at or after `entry` (False: none did, the last one
            before it was taken).
        mid_depth: The candidate at the paper's mid-depth site, when there is one and it is not `chosen`.
        reason: The sentence a report prints.
        candidates: Every hook that was available, in stream order.
    """

    chosen: SiteCandidate
    entry: str
    entry_layer: int
    after_entry: bool
    mid_depth: SiteCandidate | None
    reason: str
    candidates: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["chosen"]["label"] = self.chosen.label
        return out


def choose_site(
    candidates: Sequence[SiteCandidate],
    trace_summary: Mapping[str, Any],
    n_layers: int,
    *,
    prefer: str = "width_16k_l0_medium",
) -> SiteChoice:
    """The candidate nearest where the framing enters (module docstring), from a trace summary
    (`UpstreamTrace.summary()`, or the JSON `flipscope trace` writes). Among several SAEs at one
    hook (a release's widths and sparsities), the one whose id contains `prefer` comes first
    (the paper's `layer_17_width_16k_l0_medium` shape), then by name.

    Raises:
        FlipscopeError: no candidates, or a trace that names no entry layer (no flip traced, or
            the last position never carries half of the framing's effect).
    """
    if not candidates:
        raise FlipscopeError("no SAE to choose from")
    entry_layer = trace_summary.get("entry_layer")
    if entry_layer is None:
        n = trace_summary.get("n_cases", 0)
        why = "no flip could be traced" if not n else f"over {n} traced flips the last position never carries half"
        raise FlipscopeError(
            f"the trace names no layer where the framing enters ({why}); pass --sae to choose the site yourself"
        )
    entry = entry_site(int(entry_layer))
    ordered = sorted(candidates, key=lambda c: (site_position(c.hook), prefer not in (c.sae_id or ""), c.label))
    after = [c for c in ordered if site_position(c.hook) >= site_position(entry)]
    chosen = after[0] if after else ordered[-1]
    mid_hook = f"blocks.{n_layers // 2}.hook_resid_post"
    mid = next((c for c in ordered if c.hook == mid_hook and c.hook != chosen.hook), None)
    share = _last_share(trace_summary, int(entry_layer))
    carried = f" (restoring the last position there brings back {share:.2f} of the framing's effect)" if share else ""
    if after:
        where = "is where" if chosen.hook == entry else f"is the first SAE site after {entry}, where"
        reason = (
            f"{chosen.hook} {where} the trace says the framing reaches the answer position: layer {entry_layer}'s "
            f"input is the first to carry at least half of it at the last position by its CI's lower end{carried}."
        )
    else:
        reason = (
            f"{chosen.hook} is the last SAE site before {entry}, where the trace says the framing reaches the answer "
            f"position{carried}; no SAE sits at or after it, so the framing there is still on its own words."
        )
    return SiteChoice(
        chosen=chosen, entry=entry, entry_layer=int(entry_layer), after_entry=bool(after), mid_depth=mid,
        reason=reason, candidates=[c.hook for c in ordered],
    )  # fmt: skip


def _last_share(trace_summary: Mapping[str, Any], layer: int) -> float | None:
    """The mean share restored at the last position at `layer`'s input, if the profile has it."""
    for row in trace_summary.get("profile") or []:
        if row.get("layer") == layer:
            value = (row.get("last position") or {}).get("value")
            return float(value) if value is not None else None
    return None
