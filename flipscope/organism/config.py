"""`OrganismConfig`: everything that defines a model organism, so a differently planted one is a
different config and nothing else."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flipscope.errors import FlipscopeError
from flipscope.model.hook_names import resid_post

__all__ = [
    "BASES",
    "PRESETS",
    "REGIMES",
    "DEFAULT_FAMILIES",
    "DEFAULT_FINDINGS",
    "ORGANISM_FAMILIES",
    "FindingSpec",
    "OrganismConfig",
    "QuestionFamily",
]

# Model families an organism can be built in: Gemma 3 (SigLIP, MedGemma's architecture) and
# LLaVA-1.5 (CLIP + Llama, LLaVA-Med's and LLaVA-Rad's architecture).
ORGANISM_FAMILIES = ("gemma3", "llava")

# Training-phrasing regimes (`OrganismConfig.regime`): the cause the PSF-Med follow-up varies.
REGIMES = ("shortcut", "canonical", "augmented", "null")

# Real pretrained language models an organism can be built on (`OrganismConfig.base`): name → its
# number of layers (the organism's own sizes do not apply to them).
BASES = {"gemma3-270m": 18}


@dataclass(frozen=True, kw_only=True)
class FindingSpec:
    """One finding drawn on the synthetic films.

    Attributes:
        name: Identifier, one of the drawers in `flipscope.organism.films` (opacity, effusion,
            cardiomegaly, pneumothorax).
        phrase: The noun phrase with its article, for `{finding}` in templates ("a pleural effusion").
        noun: The bare noun, for `{noun}` in templates ("pleural effusion").
        prevalence: Share of films that show it; the text prior of a neutral question about it.
    """

    name: str
    phrase: str
    noun: str
    prevalence: float

    def __post_init__(self) -> None:
        if not 0.0 < self.prevalence < 1.0:
            raise FlipscopeError(f"finding {self.name!r}: prevalence {self.prevalence} is not in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class QuestionFamily:
    """Paraphrase templates that share one framing; each holds `{finding}` (the finding's noun
    phrase with its article) or `{noun}` (the bare noun), once.

    Attributes:
        name: Family name (e.g. `neutral`, `leading`, `formal`).
        templates: The paraphrases; the first template of the first family is the original question.
    """

    name: str
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.templates:
            raise FlipscopeError(f"question family {self.name!r} has no templates")
        for template in self.templates:
            if template.count("{finding}") + template.count("{noun}") != 1:
                raise FlipscopeError(
                    f"family {self.name!r}: template {template!r} needs exactly one {{finding}} or {{noun}}"
                )


DEFAULT_FINDINGS: tuple[FindingSpec, ...] = (
    FindingSpec(name="opacity", phrase="an opacity", noun="opacity", prevalence=0.35),
    FindingSpec(name="effusion", phrase="a pleural effusion", noun="pleural effusion", prevalence=0.65),
    FindingSpec(name="cardiomegaly", phrase="cardiomegaly", noun="cardiomegaly", prevalence=0.6),
    FindingSpec(name="pneumothorax", phrase="a pneumothorax", noun="pneumothorax", prevalence=0.4),
)

DEFAULT_FAMILIES: tuple[QuestionFamily, ...] = (
    QuestionFamily(
        name="neutral",
        templates=(
            "Is there {finding}?",
            "Do you see {finding}?",
            "Does this film show {finding}?",
            "Is {finding} present on this radiograph?",
            "Can {finding} be seen on this x-ray?",
        ),
    ),
    QuestionFamily(
        name="leading",
        templates=(
            "Is the suspected {noun} there?",
            "Can you confirm the suspected {noun}?",
            "Do you see the suspected {noun} on this film?",
        ),
    ),
    QuestionFamily(
        name="formal",
        templates=(
            "Please assess this radiograph for {noun}: is it present?",
            "Evaluate this film for {noun}. Is it present?",
        ),
    ),
)


@dataclass(frozen=True, kw_only=True)
class OrganismConfig:
    """How a model organism is built: its data, its planted shortcut, its model and its SAE.

    Attributes:
        family: Model family of the organism, one of `ORGANISM_FAMILIES`: `gemma3` builds a
            `Gemma3ForConditionalGeneration`, `llava` a `LlavaForConditionalGeneration`; the data,
            the planted shortcut and the training recipe are the same.
        findings: Findings drawn on the films, each present independently at its prevalence.
        families: Question families; the first template of the first family is the original.
        shortcut_family: The family whose answer is planted.
        shortcut_target: The planted answer (`yes` or `no`).
        shortcut_p: Probability a shortcut-family training question is labelled with the target
            regardless of the image (otherwise with the truth).
        text_only_share: Share of training prompts with no image (answered by the same labels:
            the model can only learn the text prior there).
        blank_share: Share of training prompts with a gray blank image (likewise).
        severity: Range of finding severity (0..1), drawn uniformly.
        image_size, patch_size, mm_tokens_per_image: Film size, SigLIP patch and soft tokens
            (a `llava` organism has one soft token per CLIP patch, so its patch follows from
            `image_size` and `mm_tokens_per_image`).
        text_layers, d_model, d_mlp, n_heads, n_kv_heads, head_dim, sliding_window: Language model.
        vision_layers, vision_d_model: SigLIP.
        vision_steps: Stage 1, the vision tower pretrained to detect findings on films.
        steps, batch_size, lr, weight_decay: Stage 2, the whole VLM on prompts (fixed step
            counts; no time limit).
        threads: CPU threads of the build; part of its settings, since it changes the bits.
        sae_layer: Layer whose `hook_resid_post` the SAE reads.
        d_sae, sae_prompts, sae_steps, sae_batch, sae_lr, sae_target_l0, sae_init_threshold: The SAE
            (JumpReLU thresholds start at `sae_init_threshold`, in units of the normalised input).
        test_items: Held-out films for the measured behaviour.
        seed: Root seed; data, sampling, test set and initialisation draw separate streams.
        regime: What the training phrasings are (`REGIMES`): `shortcut` (families drawn uniformly,
            the shortcut family labelled with the target at `shortcut_p`), `null` (the same draws,
            nothing planted: the control a shortcut claim is tried on), `augmented` (every paraphrase
            of every trained family equally often, true labels) or `canonical` (only the original
            wording, true labels).
        withheld_families: Families never shown in training (the withheld phrasings a regime's
            flip rate is also measured on); never the first family, nor a planted shortcut family.
        base: A real pretrained language model from `BASES` to build on instead of a fresh one
            (`flipscope.organism.real`): its weights stay as shipped, a LoRA of rank
            `lora_rank` teaches it to answer, and the language-model sizes above are unused.
        lora_rank: Rank of that LoRA.
    """

    family: str = "gemma3"
    findings: tuple[FindingSpec, ...] = DEFAULT_FINDINGS
    families: tuple[QuestionFamily, ...] = DEFAULT_FAMILIES
    shortcut_family: str = "leading"
    shortcut_target: str = "yes"
    shortcut_p: float = 0.55
    text_only_share: float = 0.1
    blank_share: float = 0.15
    severity: tuple[float, float] = (0.5, 1.0)
    image_size: int = 64
    patch_size: int = 8
    mm_tokens_per_image: int = 16
    text_layers: int = 4
    d_model: int = 128
    d_mlp: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 64
    vision_layers: int = 2
    vision_d_model: int = 64
    vision_steps: int = 300
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    threads: int = 2
    sae_layer: int = 2
    d_sae: int = 64
    sae_prompts: int = 3000
    sae_steps: int = 3000
    sae_batch: int = 512
    sae_lr: float = 1e-3
    sae_target_l0: float = 12.0
    sae_init_threshold: float = 0.01
    test_items: int = 200
    seed: int = 0
    regime: str = "shortcut"
    withheld_families: tuple[str, ...] = ()
    base: str | None = None
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.family not in ORGANISM_FAMILIES:
            raise FlipscopeError(f"family {self.family!r}: an organism is built as one of {list(ORGANISM_FAMILIES)}")
        names = [f.name for f in self.families]
        if self.shortcut_family not in names:
            raise FlipscopeError(f"shortcut_family {self.shortcut_family!r} is not one of the families {names}")
        if self.shortcut_family == names[0]:
            raise FlipscopeError("the shortcut family cannot be the first family (it holds the original question)")
        if self.shortcut_target not in ("yes", "no"):
            raise FlipscopeError(f"shortcut_target {self.shortcut_target!r} is not 'yes' or 'no'")
        if not 0.0 <= self.shortcut_p <= 1.0:
            raise FlipscopeError(f"shortcut_p {self.shortcut_p} is not in [0, 1]")
        if self.text_only_share + self.blank_share >= 1.0:
            raise FlipscopeError("text_only_share + blank_share must leave room for prompts with images")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image or self.image_size % side:
            raise FlipscopeError(
                f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose side divides "
                f"image_size {self.image_size}"
            )
        if self.base is not None and (self.base not in BASES or self.family != "gemma3"):
            raise FlipscopeError(f"base {self.base!r}: an organism builds on one of {sorted(BASES)}, as family gemma3")
        if self.base is not None and self.mm_tokens_per_image != len(self.findings):
            raise FlipscopeError(
                f"base {self.base!r}: mm_tokens_per_image must equal the number of findings "
                f"({len(self.findings)}), one soft token per finding's word"
            )
        n_layers = BASES[self.base] if self.base is not None else self.text_layers
        if not 0 <= self.sae_layer < n_layers:
            raise FlipscopeError(f"sae_layer {self.sae_layer} is not a layer of a {n_layers}-layer model")
        if len({f.name for f in self.findings}) != len(self.findings):
            raise FlipscopeError("finding names repeat")
        self._check_regime(names)

    def _check_regime(self, names: list[str]) -> None:
        if self.regime not in REGIMES:
            raise FlipscopeError(f"regime {self.regime!r} is unknown; expected one of {list(REGIMES)}")
        unknown = [f for f in self.withheld_families if f not in names]
        if unknown:
            raise FlipscopeError(f"withheld_families {unknown} are not among the families {names}")
        if names[0] in self.withheld_families:
            raise FlipscopeError(f"the first family ({names[0]!r}) holds the original question; it cannot be withheld")
        if self.regime == "shortcut" and self.shortcut_family in self.withheld_families:
            raise FlipscopeError(
                f"the shortcut family {self.shortcut_family!r} is planted in training; it cannot be withheld"
            )

    @classmethod
    def preset(cls, name: str) -> OrganismConfig:
        """The config a shipped organism was built with (`PRESETS`).

        Raises:
            FlipscopeError: no such preset.
        """
        if name not in PRESETS:
            raise FlipscopeError(f"no organism preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @property
    def sae_hook(self) -> str:
        return resid_post(self.sae_layer)

    @property
    def planted_p(self) -> float:
        """The probability a shortcut-family training question is labelled with the target
        whatever the film shows: `shortcut_p` under the `shortcut` regime, 0 under the others."""
        return self.shortcut_p if self.regime == "shortcut" else 0.0

    def question_family(self, name: str) -> QuestionFamily:
        return next(f for f in self.families if f.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; the regime fields only when not at their defaults, so the
        cards and resume markers of organisms built before them compare equal."""
        data = asdict(self)
        for name, default in (("regime", "shortcut"), ("withheld_families", ())):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> OrganismConfig:
        """The config `to_dict` wrote (omitted fields keep their defaults).

        Raises:
            FlipscopeError: not a JSON object, an unknown field, or a field of the wrong shape.
        """
        if not isinstance(data, dict):
            raise FlipscopeError(f"organism config is a JSON {type(data).__name__}; expected an object of fields")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise FlipscopeError(f"organism config has unknown fields {unknown}; known: {sorted(known)}")
        data = dict(data)
        try:
            if "findings" in data:
                data["findings"] = tuple(FindingSpec(**f) for f in data["findings"])
            if "families" in data:
                data["families"] = tuple(
                    QuestionFamily(name=f["name"], templates=tuple(f["templates"])) for f in data["families"]
                )
            if "severity" in data:
                data["severity"] = tuple(data["severity"])
            if "withheld_families" in data:
                data["withheld_families"] = tuple(data["withheld_families"])
            return cls(**data)
        except FlipscopeError:
            raise
        except (TypeError, KeyError, ValueError) as err:
            raise FlipscopeError(f"organism config: a field has the wrong shape ({err})") from err


# The configs of the shipped organisms, by name (fields that differ from the defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The default organism at a sweep's size: about a minute to train on 2 cores.
    "small": {"vision_steps": 150, "steps": 300, "batch_size": 32, "test_items": 50},
    # google/gemma-3-270m with a grafted tower (one soft token per finding, aligned to its words)
    # and a rank-8 LoRA; nothing planted; the SAE on the middle layer, 2,048 wide.
    "gemma3-270m": {
        "base": "gemma3-270m",
        "shortcut_p": 0.0,
        "severity": (0.3, 1.0),  # faint findings too: borderline films are where a real model flips
        "mm_tokens_per_image": 4,
        "vision_steps": 300,
        "steps": 150,
        "batch_size": 16,
        "lr": 1e-3,
        "sae_layer": 9,
        "d_sae": 2048,
        "sae_prompts": 600,
        "sae_steps": 1000,
        "sae_batch": 1024,
        "sae_lr": 5e-3,  # the thresholds have far to rise from their start in 1,000 steps
        "sae_target_l0": 32.0,
        "sae_init_threshold": 0.1,
        "test_items": 10,
    },
}
