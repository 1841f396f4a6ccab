"""The hooked model: `HookedVLM` on the real HF Gemma 3 VLM, its hook names, prompts, images,
answers and KV-cache scoring paths. `VLM` is the contract the experiments program against."""

from flipscope.model.answers import AnswerTokens, ParsedAnswer, binary_entropy, p_yes, parse_answer, yes_no_margin
from flipscope.model.hook_names import HookSite, hook_sites, resid_post
from flipscope.model.hooked import Edit, HookedVLM
from flipscope.model.images import BlankSpec, blank_image, load_image
from flipscope.model.prompts import IMAGE_CONDITIONS, ModelInputs, PromptBuilder, PromptSpec
from flipscope.model.protocol import VLM

__all__ = [
    "IMAGE_CONDITIONS",
    "VLM",
    "AnswerTokens",
    "BlankSpec",
    "Edit",
    "HookSite",
    "HookedVLM",
    "ModelInputs",
    "ParsedAnswer",
    "PromptBuilder",
    "PromptSpec",
    "binary_entropy",
    "blank_image",
    "hook_sites",
    "load_image",
    "p_yes",
    "parse_answer",
    "resid_post",
    "yes_no_margin",
]
