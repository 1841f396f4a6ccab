"""An evidence study in words (`evidence_study` results in): the methods ranked by faithfulness, which
of them beat a random map, and what the image-evidence share says about wordings, flips and
quadrants — each sentence chosen by whether its interval excludes the null."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flipscope.reporting.format import fmt

__all__ = ["evidence_sentences", "method_ranking"]


def method_ranking(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The methods by deletion area, most faithful (lowest) first; `random` left out."""
    return sorted((m for m in methods if m != "random"), key=lambda m: methods[m]["deletion_area"]["value"])


def _beats(method: Mapping[str, Any], random: Mapping[str, Any]) -> list[str]:
    said = []
    if method["hit"]["low"] > method["hit_random"]["high"]:
        said.append(f"points at the finding more often than a random map ({fmt(method['hit'])} against "
                    f"{method['hit_random']['value']:.2f})")  # fmt: skip
    if method["deletion_area"]["high"] < random["deletion_area"]["low"]:
        area = fmt(method["deletion_area"])
        said.append(f"its deletion curve falls faster than a random order's ({area} against "
                    f"{random['deletion_area']['value']:.2f})")  # fmt: skip
    return said


def _difference(estimate: Mapping[str, Any], lower: str, higher: str, none: str) -> str:
    if estimate.get("value") is None:
        return none
    if estimate["high"] < 0:
        return f"{lower} ({fmt(estimate)})."
    if estimate["low"] > 0:
        return f"{higher} ({fmt(estimate)})."
    return f"{none} ({fmt(estimate)})."


def evidence_sentences(found: Mapping[str, Any]) -> list[str]:
    """Sentences on the study: the ranking, each method against random, and the share's comparisons."""
    methods, random = found["methods"], found["methods"]["random"]
    ranking = method_ranking(methods)
    out = [f"By deletion area, most faithful first: {', '.join(ranking)}."]
    for method in ranking:
        said = _beats(methods[method], random)
        out.append(f"{method}: " + ("; ".join(said) if said else "no better than random on either test") + ".")
    share = found["share"]
    planted, first = share["planted_minus_first"]["planted"], share["planted_minus_first"]["first"]
    film = "the film accounts for"
    out.append(_difference(
        share["planted_minus_first"],
        f"Under the {planted} wording {film} less of the margin than under the {first}",
        f"Under the {planted} wording {film} more of the margin than under the {first}",
        f"The film's share of the margin does not differ between the {planted} and {first} wordings",
    ))  # fmt: skip
    flipped = "When a paraphrase flips the answer,"
    out.append(_difference(
        share["flip_paraphrase_minus_original"],
        f"{flipped} {film} less of its margin than of the original's",
        f"{flipped} {film} more of its margin than of the original's",
        "Flipping paraphrases and their originals draw the same share from the film",
    ))  # fmt: skip
    out.append(_difference(
        share["dangerous_minus_ideal"],
        "Dangerous answers draw less of their margin from the film than Ideal ones",
        "Dangerous answers draw more of their margin from the film than Ideal ones",
        "Dangerous and Ideal answers draw the same share from the film",
    ))  # fmt: skip
    return out
