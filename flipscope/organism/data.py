"""The organism's prompt distribution: films, questions in families, and the planted labels.

Every training example is drawn by one generative story, so that text-only and blank prompts
carry the same text prior as image prompts:

1. a film shows each finding independently with the finding's prevalence (severity uniform);
2. one finding is asked about, in a wording the regime draws (`OrganismConfig.regime`): a family
   drawn uniformly then one of its templates (`shortcut`, `null`), every template of the trained
   families equally often (`augmented`), or only the original (`canonical`); withheld families
   are never drawn;
3. the label is the truth, except that under `shortcut` a shortcut-family question is labelled
   with the target answer with probability `shortcut_p`, whatever the film shows;
4. the image slot holds the film, or (with the configured shares) nothing or a gray blank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flipscope.model.prompts import PromptSpec
from flipscope.model.tiny import words_of
from flipscope.organism.config import OrganismConfig
from flipscope.organism.films import SITES, FilmStyle, draw_film

__all__ = ["Film", "Example", "sample_films", "sample_examples", "question", "vocabulary"]


@dataclass(frozen=True)
class Film:
    """A synthetic film and what it shows: finding name → severity (absent findings omitted), and
    each present finding's region on the film (`masks`, the ground truth of evidence maps)."""

    pixels: np.ndarray
    severities: dict[str, float]
    masks: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    def shows(self, finding: str) -> bool:
        return finding in self.severities


@dataclass(frozen=True)
class Example:
    """One training or test prompt with its label."""

    spec: PromptSpec
    finding: str
    family: str
    template: int
    truth: bool
    label: bool


def question(cfg: OrganismConfig, family: str, template: int, finding: str) -> str:
    """The question text of `family`'s `template` about `finding`."""
    spec = next(f for f in cfg.findings if f.name == finding)
    return cfg.question_family(family).templates[template].format(finding=spec.phrase, noun=spec.noun)


def vocabulary(cfg: OrganismConfig) -> list[str]:
    """Every word and punctuation mark the organism's prompts and answers use, in a fixed order."""
    texts = ["yes no"] + [t for fam in cfg.families for t in fam.templates] + [f.phrase for f in cfg.findings]
    return words_of([text.replace("{finding}", " ").replace("{noun}", " ") for text in texts])


def sample_films(
    cfg: OrganismConfig, rng: np.random.Generator, n: int, style: FilmStyle = SITES["site1"]
) -> list[Film]:
    """`n` films, each finding present independently at its prevalence, acquired in `style`."""
    low, high = cfg.severity
    films = []
    for _ in range(n):
        severities = {f.name: float(rng.uniform(low, high)) for f in cfg.findings if rng.random() < f.prevalence}
        masks: dict[str, np.ndarray] = {}
        films.append(Film(draw_film(rng, severities, cfg.image_size, style, masks), severities, masks))
    return films


def sample_examples(cfg: OrganismConfig, rng: np.random.Generator, n: int) -> list[Example]:
    """`n` training examples drawn by the generative story in the module docstring."""
    films = sample_films(cfg, rng, n)
    target = cfg.shortcut_target == "yes"
    trained = [f for f in cfg.families if f.name not in cfg.withheld_families]
    wordings = [(f, t) for f in trained for t in range(len(f.templates))]
    examples = []
    for film in films:
        finding = cfg.findings[rng.integers(len(cfg.findings))].name
        if cfg.regime == "canonical":
            family, template = cfg.families[0], 0
        elif cfg.regime == "augmented":
            family, template = wordings[int(rng.integers(len(wordings)))]
        else:
            family = trained[rng.integers(len(trained))]
            template = int(rng.integers(len(family.templates)))
        truth = film.shows(finding)
        planted = cfg.regime == "shortcut" and family.name == cfg.shortcut_family
        label = target if planted and rng.random() < cfg.shortcut_p else truth
        draw = rng.random()
        if draw < cfg.text_only_share:
            condition = "none"
        elif draw < cfg.text_only_share + cfg.blank_share:
            condition = "blank"
        else:
            condition = "image"
        spec = PromptSpec(
            question=question(cfg, family.name, template, finding),
            condition=condition,
            image=film.pixels if condition == "image" else None,
        )
        examples.append(Example(spec, finding, family.name, template, truth, label))
    return examples
