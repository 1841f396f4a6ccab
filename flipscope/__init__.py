"""flipscope: why a medical VLM flips its yes/no answer under paraphrase, and which feature does it.

Tensor shapes in signatures use one vocabulary of dimension names:

- `batch`: prompts in a batch; `pos`: token positions (left-padded, last prompt token at -1);
- `d_model`: language-model residual width; `d_vocab`: vocabulary size;
- `d_sae`: SAE features; `n_images`: images in a batch; `n_patches`: vision patches;
- `n_image_tokens`: image soft tokens per image; `d_vision`: vision width;
- `channel`, `height`, `width`: image tensor axes.
"""

from flipscope.answers import (
    AnswerTokens,
    ParsedAnswer,
    binary_entropy,
    p_yes,
    parse_answer,
    yes_no_margin,
)
from flipscope.errors import FlipscopeError
from flipscope.hook_table import HookSite, hook_sites
from flipscope.images import BlankSpec, blank_image, load_image
from flipscope.model import HookedVLM
from flipscope.prompts import IMAGE_CONDITIONS, ModelInputs, PromptBuilder, PromptSpec
from flipscope.questions import Question, load_questions, questions_from_table
from flipscope.sae import SAEEncoding, check_sae, encode_with_error, load_sae
from flipscope.stats import Estimate, bootstrap
from flipscope.sweep import EvalConfig, merge_shards, run_sweep

__all__ = [
    "IMAGE_CONDITIONS",
    "AnswerTokens",
    "BlankSpec",
    "FlipscopeError",
    "HookSite",
    "HookedVLM",
    "ModelInputs",
    "ParsedAnswer",
    "PromptBuilder",
    "PromptSpec",
    "Question",
    "SAEEncoding",
    "Estimate",
    "EvalConfig",
    "binary_entropy",
    "blank_image",
    "bootstrap",
    "check_sae",
    "encode_with_error",
    "hook_sites",
    "load_image",
    "load_questions",
    "load_sae",
    "merge_shards",
    "p_yes",
    "parse_answer",
    "questions_from_table",
    "run_sweep",
    "yes_no_margin",
]
