"""`--features` as numbers or as discover's ranking: `framing:K` takes the first K framing
features of a discovery made with the very SAE the command loaded, so a feature index always
means the dictionary it was ranked in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flipscope.cli.common import ints
from flipscope.errors import FlipscopeError

__all__ = ["DISCOVERY_HELP", "feature_request", "features_help", "resolve_features"]

DISCOVERY_HELP = "With --features framing:K: the features JSON `flipscope discover` wrote with this SAE."


def features_help(what: str) -> str:
    return (
        f"SAE features to {what}: numbers, e.g. 38 or 38,32, or framing:K, the first K of discover's framing "
        "ranking (--discovery)."
    )


def feature_request(text: str, option: str = "--features") -> list[int] | int:
    """The features `text` names (a list), or the count K of `framing:K` (an int)."""
    head, colon, count = text.strip().partition(":")
    if colon:
        if head.strip() != "framing" or not count.strip().isdigit() or int(count) < 1:
            raise FlipscopeError(f"{option} {text!r}: expected numbers (e.g. 38,32) or framing:K with K >= 1")
        return int(count)
    chosen = ints(text, option)
    if not chosen:
        raise FlipscopeError(f"{option} {text!r} names no feature")
    return chosen


def resolve_features(
    request: list[int] | int, discovery: Path | None, sae: Any, option: str = "--features"
) -> list[int]:
    """`request`'s features: a list as it is; for `framing:K`, the first K framing features of
    `discovery`, which must have ranked this SAE's features (its weights' digest, or for a
    discovery without one, its sizes).

    Raises:
        FlipscopeError: no discovery given, one made with another SAE, or one with no framing feature.
    """
    if isinstance(request, list):
        return request
    if discovery is None:
        raise FlipscopeError(f"{option} framing:{request} needs --discovery (a features JSON from flipscope discover)")
    from flipscope.experiments.discovery import load_discovery
    from flipscope.sae.load import sae_digest

    found = load_discovery(discovery)
    made = found.meta["sae"]
    here = {"d_sae": int(sae.cfg.d_sae), "d_in": int(sae.cfg.d_in)}
    if made.get("digest") is None:
        same = all(made.get(k) == v for k, v in here.items())
        typer.echo(f"--discovery {str(discovery)!r} has no SAE digest: matched to the SAE by its sizes only")
    else:
        same = made["digest"] == sae_digest(sae)
    if not same:
        raise FlipscopeError(
            f"--discovery {str(discovery)!r} ranked another SAE's features ({made.get('hook')}, {made.get('d_sae')} "
            f"features) than the one loaded ({sae.cfg.metadata.hook_name}, {here['d_sae']}); run flipscope discover "
            "with this SAE"
        )
    chosen = found.framing_features(request)
    if not chosen:
        raise FlipscopeError(
            f"--discovery {str(discovery)!r} labels no feature as carrying the framing ({found.verdict}); "
            "name the features by number"
        )
    if len(chosen) < request:
        typer.echo(f"{option} framing:{request}: the discovery labels only {len(chosen)} framing features: {chosen}")
    return chosen
