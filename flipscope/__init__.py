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
from flipscope.clamp import (
    ClampedVLM,
    DirectionAblatedVLM,
    InterventionVLM,
    clamp,
    compare_clamped,
    compare_interventions,
)
from flipscope.demo import DemoConfig, run_demo
from flipscope.errors import FlipscopeError
from flipscope.evaluate import QUADRANTS, flip_rate_cells, question_table, summarize
from flipscope.features import Discovery, activation_by_family, diffmean_direction, discover, feature_table
from flipscope.flipbank import CurationRules, check_flipbank_model, curate, load_flipbank, save_flipbank
from flipscope.hook_table import HookSite, hook_sites
from flipscope.images import BlankSpec, blank_image, load_image
from flipscope.model import HookedVLM
from flipscope.pairs import PairActivations, collect_pairs
from flipscope.patching import PatchResult, layer_sweep, patch_bank, patch_sweep, recovery, summarize_patch
from flipscope.plots import save_figures
from flipscope.prompts import IMAGE_CONDITIONS, ModelInputs, PromptBuilder, PromptSpec
from flipscope.questions import Question, load_questions, questions_from_table
from flipscope.sae import PositionEncoding, SAEEncoding, check_sae, encode_prompts, encode_with_error, load_sae
from flipscope.stats import Estimate, auc, bh_qvalues, bootstrap, correlations, mann_whitney
from flipscope.sweep import EvalConfig, merge_shards, run_sweep

__all__ = [
    "IMAGE_CONDITIONS",
    "QUADRANTS",
    "AnswerTokens",
    "BlankSpec",
    "ClampedVLM",
    "CurationRules",
    "DemoConfig",
    "DirectionAblatedVLM",
    "Discovery",
    "Estimate",
    "EvalConfig",
    "FlipscopeError",
    "HookedVLM",
    "HookSite",
    "InterventionVLM",
    "ModelInputs",
    "PairActivations",
    "ParsedAnswer",
    "PatchResult",
    "PositionEncoding",
    "PromptBuilder",
    "PromptSpec",
    "Question",
    "SAEEncoding",
    "activation_by_family",
    "auc",
    "bh_qvalues",
    "binary_entropy",
    "blank_image",
    "bootstrap",
    "check_flipbank_model",
    "check_sae",
    "clamp",
    "collect_pairs",
    "compare_clamped",
    "compare_interventions",
    "correlations",
    "curate",
    "diffmean_direction",
    "discover",
    "encode_prompts",
    "encode_with_error",
    "feature_table",
    "flip_rate_cells",
    "hook_sites",
    "layer_sweep",
    "load_flipbank",
    "load_image",
    "load_questions",
    "load_sae",
    "mann_whitney",
    "merge_shards",
    "p_yes",
    "parse_answer",
    "patch_bank",
    "patch_sweep",
    "question_table",
    "questions_from_table",
    "recovery",
    "run_demo",
    "run_sweep",
    "save_figures",
    "save_flipbank",
    "summarize",
    "summarize_patch",
    "yes_no_margin",
]
