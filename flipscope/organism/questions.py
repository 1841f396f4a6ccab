"""The organism's held-out films as an evaluation dataset: PNG files and a questions JSONL in
flipscope's schema, so evaluation runs on it exactly as on a user's data.

One question per film × finding: the original is the first family's first template; the
paraphrases are every other template, tagged with their family as the paraphrase strategy (so
flips by strategy show where the planted shortcut acts).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from flipscope.data.atomic import write_atomic
from flipscope.errors import FlipscopeError
from flipscope.organism.config import OrganismConfig
from flipscope.organism.data import Film, question, sample_films
from flipscope.organism.films import SITES
from flipscope.organism.train import STREAM_TEST, stream

__all__ = ["export_questions", "report_text"]

_SIZES = ((0.67, "small"), (0.84, "moderate"), (1.01, "large"))


def report_text(cfg: OrganismConfig, film: Film) -> str:
    """A one-sentence radiology report of what the film shows (severity as small / moderate /
    large), the evidence a text-only model is given in place of the film."""
    shown = [
        f"{next(word for top, word in _SIZES if film.severities[f.name] < top)} {f.noun}"
        for f in cfg.findings
        if film.shows(f.name)
    ]
    absent = [f.noun for f in cfg.findings if not film.shows(f.name)]
    parts = []
    if shown:
        parts.append("Findings: " + ", ".join(shown) + ".")
    if absent:
        parts.append("No " + " or ".join(absent) + ".")
    return " ".join(parts)


def export_questions(
    cfg: OrganismConfig,
    out: str | Path,
    n_films: int | None = None,
    site: str = "site1",
    *,
    report: bool = False,
    first: int = 0,
) -> Path:
    """Write `n_films` held-out films (default `cfg.test_items`) and their questions to `out`.

    `first` skips that many films of the held-out stream (numbering continues from it), so an
    audit can run on films that a FlipBank, and a direction estimated from it, never saw.

    `site` is the acquisition style (`flipscope.organism.films.SITES`): the second site draws the
    same patients (findings and severities) as the first, filmed differently; its question ids
    start with the site's name, so runs on the two sites never pass for runs on one.

    With `report`, each question carries the film's one-sentence report (`report_text`) as its
    `context` instead of the image, for a text-only model.

    Returns the path of `questions.jsonl` (images under `out/images/`, referenced relatively).
    """
    if site not in SITES:
        raise FlipscopeError(f"site {site!r} is unknown; expected one of {sorted(SITES)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if first < 0:
        raise FlipscopeError(f"first film {first} is negative")
    n_films = cfg.test_items if n_films is None else n_films
    if n_films < 1:
        raise FlipscopeError(f"n_films {n_films}: expected at least 1 film")
    films = sample_films(cfg, stream(cfg, STREAM_TEST), first + n_films, SITES[site])[first:]
    prefix = "" if site == "site1" else f"{site}-"
    prompts = [(fam.name, t) for fam in cfg.families for t in range(len(fam.templates))]
    lines = []
    for number, film in enumerate(films, start=first):
        image = Path("images") / f"film{number:04d}.png"
        Image.fromarray(film.pixels).save(out / image)
        for finding in cfg.findings:
            texts = [question(cfg, fam, t, finding.name) for fam, t in prompts]
            evidence = {"context": report_text(cfg, film)} if report else {"image": str(image)}
            lines.append(
                {
                    "id": f"{prefix}film{number:04d}-{finding.name}",
                    **evidence,
                    "finding": finding.name,
                    "answer": "yes" if film.shows(finding.name) else "no",
                    "question": texts[0],
                    "paraphrases": texts[1:],
                    "strategies": [fam for fam, _ in prompts[1:]],
                }
            )
    path = out / "questions.jsonl"
    write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))
    return path
