"""`HookedVLM`: TransformerLens-style hooks on the real HF Gemma 3 VLM.

`HookedVLM` is a `transformer_lens.HookedRootModule` around an unmodified HF
`Gemma3ForConditionalGeneration` (MedGemma 4B or any Gemma 3 VLM). Each hook name of
`flipscope.hook_table` is a `HookPoint`; a torch hook on the HF module that the table names
calls the `HookPoint` — and that torch hook exists only while the `HookPoint` has hooks, so an
unhooked forward is the plain HF forward (same kernels, sdpa attention, bit-identical logits)
and a hooked one pays only for the sites it uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration

from flipscope.answers import AnswerTokens, yes_no_margin
from flipscope.errors import FlipscopeError
from flipscope.hook_table import HookSite, hook_sites
from flipscope.prompts import ModelInputs, PromptBuilder

__all__ = ["HookedVLM", "Positions"]

logger = logging.getLogger(__name__)

HookFn = Callable[..., Any]
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
Positions = int | Literal["last"] | slice | Sequence[int] | Int[Tensor, "batch"] | None


class _SiteHookPoint(HookPoint):
    """A `HookPoint` fired from an HF module; attaches its torch hook there only while in use."""

    def __init__(self, site: HookSite) -> None:
        super().__init__()
        self._site = (site,)  # a tuple, so the HF module is not registered as a child
        self._site_handle: torch.utils.hooks.RemovableHandle | None = None

    def add_hook(self, *args: Any, **kwargs: Any) -> None:
        super().add_hook(*args, **kwargs)
        self._sync_site()

    def remove_hooks(self, *args: Any, **kwargs: Any) -> None:
        super().remove_hooks(*args, **kwargs)
        self._sync_site()

    def _fire_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def _fire_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}

    def _sync_site(self) -> None:
        in_use = bool(self.fwd_hooks or self.bwd_hooks)
        if in_use and self._site_handle is None:
            module, reads = self._site[0]
            if reads == "output":
                self._site_handle = module.register_forward_hook(self._fire_output)
            else:
                self._site_handle = module.register_forward_pre_hook(self._fire_input, with_kwargs=True)
        elif not in_use and self._site_handle is not None:
            self._site_handle.remove()
            self._site_handle = None


def _describe_names(names: Sequence[str]) -> str:
    """Hook names compressed for an error message: `blocks.{0..33}.hook_resid_post, ...`."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[str] = []
    for name in names:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            singles.append(name)
            continue
        key = (".".join(parts[:index]), ".".join(parts[index + 1 :]))
        groups.setdefault(key, []).append(int(parts[index]))
    described = [f"{pre}.{{{min(ix)}..{max(ix)}}}.{post}" for (pre, post), ix in groups.items()]
    return ", ".join(described + singles)


def _is_text_hook(name: str) -> bool:
    return name.startswith(("blocks.", "ln_final."))


def _select_positions(tensor: Float[Tensor, "batch pos d"], positions: Positions) -> Tensor:
    if positions is None:
        return tensor
    if positions == "last":
        positions = -1
    if isinstance(positions, Tensor):
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        return tensor[rows, positions.to(tensor.device)]
    if isinstance(positions, int | slice):
        # Basic indexing returns a view that would keep the whole activation alive: copy.
        return tensor[:, positions].clone()
    return tensor[:, list(positions)]


class HookedVLM(HookedRootModule):
    """A Gemma 3 VLM with TransformerLens hook points and yes/no scoring.

    Attributes:
        hf_model: The wrapped HF model (never modified).
        processor: Its processor (tokenizer, image processor, chat template).
        prompts: A `PromptBuilder` over the processor.
        name_or_path: Where it was loaded from, for result files.
    """

    def __init__(self, hf_model: Gemma3ForConditionalGeneration, processor: Any, *, name_or_path: str = "") -> None:
        super().__init__()
        self.hf_model = hf_model
        self.processor = processor
        self.prompts = PromptBuilder(processor)
        self.name_or_path = name_or_path
        self._hook_points: dict[str, _SiteHookPoint] = {}
        for name, site in hook_sites(hf_model).items():
            point = _SiteHookPoint(site)
            *parents, leaf = name.split(".")
            node: nn.Module = self
            for part in parents:
                child = node._modules.get(part)
                if child is None:
                    child = nn.Module()
                    node.add_module(part, child)
                node = child
            node.add_module(leaf, point)
            self._hook_points[name] = point
        self.setup()

    def setup(self) -> None:
        """Index the hook points only (TransformerLens's version would also rename HF modules)."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, point in self._hook_points.items():
            point.name = name
            self.mod_dict[name] = point
            self.hook_dict[name] = point

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
    ) -> HookedVLM:
        """Load a Gemma 3 VLM and its processor by hub id (e.g. `google/medgemma-4b-it`) or local dir.

        Weights are read from safetensors only and no remote code is run. `attn_implementation`
        stays HF's default (sdpa) unless given.

        Raises:
            FlipscopeError: the directory or hub model cannot be loaded, or is not a Gemma 3 VLM.
        """
        source = str(name_or_path)
        local = Path(source).expanduser()
        is_local = local.exists() or source.startswith((".", "/", "~"))
        if is_local and not (local / "config.json").is_file():
            raise FlipscopeError(f"model directory {source!r} has no config.json; expected a saved Gemma 3 VLM")
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        except OSError as err:
            raise FlipscopeError(_hub_help(source, err)) from err
        if getattr(config, "model_type", None) != "gemma3":
            raise FlipscopeError(
                f"model {source!r} has model_type {getattr(config, 'model_type', None)!r}; "
                "expected 'gemma3' (a Gemma3ForConditionalGeneration such as MedGemma 4B)"
            )
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        try:
            hf_model = Gemma3ForConditionalGeneration.from_pretrained(
                source, dtype=dtype, use_safetensors=True, trust_remote_code=False, **extra
            )
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        except OSError as err:
            raise FlipscopeError(_hub_help(source, err)) from err
        hf_model.to(device).eval()
        return cls(hf_model, processor, name_or_path=source)

    # ----------------------------------------------------------------------------------- facts
    @property
    def n_layers(self) -> int:
        return int(self.hf_model.config.text_config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.hf_model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def identity(self) -> dict[str, Any]:
        """Which model produced a result: its name (hub id or folder name), size and a weight
        fingerprint, so results (evaluation stores, FlipBanks) can be checked against a model.

        The fingerprint hashes the first 64 values of every parameter rounded to bfloat16, so a
        float32 and a bfloat16 load of one checkpoint agree, on any device.
        """
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, param in self.hf_model.named_parameters():
                head = param.detach().reshape(-1)[:64].to("cpu", torch.bfloat16).to(torch.float32)
                digest.update(name.encode() + str(tuple(param.shape)).encode() + head.numpy().tobytes())
        local = Path(self.name_or_path).expanduser()
        return {
            "name": local.resolve().name if local.exists() else self.name_or_path,
            "architecture": type(self.hf_model).__name__,
            "n_params": sum(p.numel() for p in self.hf_model.parameters()),
            "fingerprint": digest.hexdigest()[:16],
        }

    @cached_property
    def answer_tokens(self) -> AnswerTokens:
        """Yes/no token ids of this model's tokenizer (see `flipscope.answers`)."""
        return AnswerTokens.from_tokenizer(self.processor.tokenizer)

    # ----------------------------------------------------------------------------------- hooks
    def check_hook_name(self, name: str) -> None:
        """Raise `FlipscopeError` listing the valid names if `name` is not a hook point."""
        if name not in self.hook_dict:
            raise FlipscopeError(f"unknown hook name {name!r}; valid names: {_describe_names(list(self.hook_dict))}")

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, *args: Any, **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedVLM]:
        """Hooks added for the duration of the block and removed in `finally`, even on error."""
        for name, _ in (*fwd_hooks, *bwd_hooks):
            if isinstance(name, str):
                self.check_hook_name(name)
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts):
            yield self

    # ----------------------------------------------------------------------------------- running
    @staticmethod
    def _kwargs(inputs: ModelInputs | Mapping[str, Tensor]) -> dict[str, Tensor]:
        return inputs.as_kwargs() if isinstance(inputs, ModelInputs) else dict(inputs)

    def forward(
        self, inputs: ModelInputs | Mapping[str, Tensor], *, logits_to_keep: int = 0
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of the HF forward on `inputs` (all positions, or the last `logits_to_keep`)."""
        return self.hf_model(**self._kwargs(inputs), use_cache=False, logits_to_keep=logits_to_keep).logits

    def run_with_cache(
        self,
        inputs: ModelInputs | Mapping[str, Tensor],
        *,
        names_filter: NamesFilter = None,
        positions: Positions = None,
        device: str | torch.device | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
        """Run the model and cache the activations asked for.

        Args:
            inputs: A batch from `PromptBuilder.build` (left-padded) or HF processor output.
            names_filter: A hook name, a list of names, or a predicate; None caches every hook.
            positions: Token positions to keep for the language-model hooks (`blocks.*`,
                `ln_final.*`): an int or `"last"` (drops the position axis), a slice or list of
                ints, or a per-row index tensor `[batch]`. Vision and projector hooks are kept
                whole. Only the selection is stored, so a sweep does not hold every activation.
            device: Where to store the cache (default: the model's device).
            logits_to_keep: Return logits for the last this many positions only (0: all); 1
                when only the answer is read spares the unembedding of every position.

        Returns:
            The logits and a dict from hook name to activation (detached).
        """
        if names_filter is None:
            selected = list(self.hook_dict)
        elif isinstance(names_filter, str):
            selected = [names_filter]
        elif callable(names_filter):
            selected = [name for name in self.hook_dict if names_filter(name)]
        else:
            selected = list(names_filter)
        cache: dict[str, Tensor] = {}

        def save(tensor: Tensor, hook: HookPoint) -> None:
            kept = _select_positions(tensor, positions) if _is_text_hook(hook.name) else tensor
            cache[hook.name] = kept.detach().to(device) if device is not None else kept.detach()

        with self.hooks(fwd_hooks=[(name, save) for name in selected]):
            logits = self(inputs, logits_to_keep=logits_to_keep)
        return logits, cache

    def run_with_hooks(
        self,
        inputs: ModelInputs | Mapping[str, Tensor],
        *,
        fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        bwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
        logits_to_keep: int = 0,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits with `fwd_hooks` (and `bwd_hooks`) active for this one forward."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(inputs, logits_to_keep=logits_to_keep)

    def last_logits(self, inputs: ModelInputs | Mapping[str, Tensor]) -> Float[Tensor, "batch d_vocab"]:
        """Next-token logits at the last prompt position (inputs must be left-padded)."""
        kwargs = self._kwargs(inputs)
        if "attention_mask" in kwargs and not bool(kwargs["attention_mask"][:, -1].all()):
            raise FlipscopeError("inputs are right-padded; build them with PromptBuilder (left padding)")
        return self(kwargs, logits_to_keep=1)[:, -1]

    @torch.no_grad()
    def score(self, inputs: ModelInputs | Mapping[str, Tensor]) -> Float[Tensor, " batch"]:
        """Yes-minus-no margin at the last prompt position, one per row (float32)."""
        return yes_no_margin(self.last_logits(inputs), self.answer_tokens)

    @torch.no_grad()
    def generate(self, inputs: ModelInputs | Mapping[str, Tensor], *, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers as text, with any active hooks firing at every step."""
        kwargs = self._kwargs(inputs)
        kwargs.pop("position_ids", None)  # generate derives positions from the attention mask
        prompt_len = kwargs["input_ids"].shape[1]
        out = self.hf_model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.processor.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


def _hub_help(source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = " (HF_HUB_OFFLINE is set, so the hub was not asked)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return (
        f"could not load model {source!r}{offline}: {reason}. "
        "For a gated hub model such as google/medgemma-4b-it, accept its terms on the model page, "
        "then run `hf auth login` or set HF_TOKEN; or pass the path of a local copy."
    )
