"""A door for models no family loads: custom-code checkpoints (CheXagent, RadFM, MAIRA-2, LLaVA-Rad's
original code) run through a small class the user writes in their own file.

flipscope never sets `trust_remote_code`; a user who trusts a checkpoint's code imports it
themselves, in their adapter, and passes `--model-adapter path/to/file.py:Class` (or
`package.module:Class`). The class is built as `Class(model)` (`model`: the `--model` string)
and implements::

    class MyAdapter:
        def __init__(self, model: str): ...                       # load it your way
        def build(self, prompts: list[Prompt]) -> Any: ...       # one batch for the model
        def score(self, batch: Any) -> torch.Tensor: ...         # yes-minus-no margin per prompt
        # optional:
        conditions: tuple[str, ...] = ("image", "blank", "none", "swap")
        def generate(self, batch, max_new_tokens: int) -> list[str]: ...
        def hook_sites(self) -> dict[str, torch.nn.Module]: ...  # hook name -> module (its output)
        def identity(self) -> dict: ...                          # written into result headers

`Prompt` carries the question, what stands in the image slot (the film, the blank, the other
patient's film, already loaded as 8-bit RGB; None under `none`) and any text passage.
Evaluation and everything built on margins work; hook sites make `hooks` / `run_with_cache` work.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from flipscope.errors import FlipscopeError
from flipscope.model.caching import NamesFilter, selected_names
from flipscope.model.families.sites import HookSite
from flipscope.model.hook_points import SiteHookPoint, describe_names
from flipscope.model.images import BlankSpec, blank_image, load_image
from flipscope.model.prompts import IMAGE_CONDITIONS, PromptSpec

__all__ = ["AdaptedModel", "Prompt", "load_model_adapter"]

BLANK_SIZE = (896, 896)  # MedGemma's input size; an adapter's processor resizes it as it resizes films


@dataclass(frozen=True)
class Prompt:
    """One prompt as an adapter sees it.

    Attributes:
        question: The wording.
        condition: `image`, `blank`, `none`, `swap` or `context`.
        image: What stands in the image slot (8-bit RGB), or None when no image is shown.
        context: The text passage shown (`context`, or another question's under `swap`), or None.
    """

    question: str
    condition: str
    image: Image.Image | None
    context: str | None


@dataclass
class AdapterPrompts:
    """Turns flipscope's `PromptSpec`s into the adapter's batches (blank drawn at `BLANK_SIZE`)."""

    adapter: Any
    blank: BlankSpec = field(default_factory=BlankSpec)

    def with_blank(self, blank: BlankSpec) -> AdapterPrompts:
        return AdapterPrompts(self.adapter, blank)

    def prompt(self, spec: PromptSpec) -> Prompt:
        image = None
        if spec.condition == "image":
            image = load_image(spec.image)
        elif spec.condition == "swap" and spec.swap_image is not None:
            image = load_image(spec.swap_image)
        elif spec.condition == "blank":
            image = blank_image(self.blank, BLANK_SIZE)
        return Prompt(spec.question, spec.condition, image, spec.passage)

    def build(self, specs: Sequence[PromptSpec]) -> Any:
        return self.adapter.build([self.prompt(spec) for spec in specs])


class AdaptedModel(HookedRootModule):
    """A user's adapter as a flipscope model: `score`, `generate`, and hooks where it names sites."""

    def __init__(self, adapter: Any, name_or_path: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.name_or_path = name_or_path
        self.processor = None
        self.prompts = AdapterPrompts(adapter)
        self.conditions: tuple[str, ...] = tuple(getattr(adapter, "conditions", IMAGE_CONDITIONS[:4]))
        sites: dict[str, nn.Module] = adapter.hook_sites() if hasattr(adapter, "hook_sites") else {}
        self._points = {}
        for name, module in sites.items():
            point = SiteHookPoint(HookSite(module, "output"))
            self.add_module(name.replace(".", "__"), point)
            self._points[name] = point
        self.mod_dict, self.hook_dict = {}, {}
        for name, point in self._points.items():
            point.name = name
            self.mod_dict[name] = self.hook_dict[name] = point

    def setup(self) -> None:  # the hook points are indexed in __init__
        pass

    def identity(self) -> dict[str, Any]:
        own = self.adapter.identity() if hasattr(self.adapter, "identity") else {}
        return {"name": self.name_or_path, "adapter_class": type(self.adapter).__qualname__, **own}

    def check_hook_name(self, name: str) -> None:
        if name not in self.hook_dict:
            valid = describe_names(list(self.hook_dict)) or "none (the adapter names no hook_sites)"
            raise FlipscopeError(f"unknown hook name {name!r}; valid names: {valid}")

    @contextmanager
    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), **kwargs: Any) -> Iterator[AdaptedModel]:
        for name, _ in (*fwd_hooks, *bwd_hooks):
            if isinstance(name, str):
                self.check_hook_name(name)
        with super().hooks(list(fwd_hooks), list(bwd_hooks), **kwargs):
            yield self

    @torch.no_grad()
    def score(self, batch: Any) -> Float[Tensor, " batch"]:
        margins = torch.as_tensor(self.adapter.score(batch), dtype=torch.float32).reshape(-1)
        return margins

    def generate(self, batch: Any, *, max_new_tokens: int = 16) -> list[str]:
        if not hasattr(self.adapter, "generate"):
            raise FlipscopeError(
                f"model adapter {type(self.adapter).__qualname__} has no generate(batch, max_new_tokens)"
            )
        return list(self.adapter.generate(batch, max_new_tokens))

    def run_with_cache(self, batch: Any, *, names_filter: NamesFilter = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Margins and the activations at the named sites (all when `names_filter` is None). An
        adapter that runs its prompts in separate forwards fires a site once per forward: those
        activations are joined along the batch.

        Raises:
            FlipscopeError: a name is not one of the adapter's sites, or one site's activations
                from separate forwards differ in shape beyond the batch (prompts of different
                lengths: cache one prompt at a time).
        """
        names = selected_names(self.hook_dict, names_filter)
        fired: dict[str, list[Tensor]] = {name: [] for name in names}

        def save(tensor: Tensor, hook: Any) -> None:
            fired[hook.name].append(tensor.detach())

        with self.hooks(fwd_hooks=[(name, save) for name in names]):  # checks each name
            margins = self.score(batch)
        return margins, {name: _joined(name, parts) for name, parts in fired.items() if parts}

    def cache_activations(self, batch: Any, *, names_filter: NamesFilter = None) -> dict[str, Tensor]:
        """`run_with_cache`'s activations alone. The adapter's forward runs to its end: flipscope
        does not stop code it did not write."""
        return self.run_with_cache(batch, names_filter=names_filter)[1]


def _joined(name: str, parts: list[Tensor]) -> Tensor:
    if len(parts) == 1:
        return parts[0]
    shapes = {tuple(part.shape[1:]) for part in parts}
    if len(shapes) > 1:
        raise FlipscopeError(
            f"hook {name!r} fired {len(parts)} times with shapes {sorted(tuple(p.shape) for p in parts)}: the "
            "adapter runs its prompts in separate forwards of different lengths; cache one prompt at a time"
        )
    return torch.cat(parts)


def load_model_adapter(spec: str, model: str) -> AdaptedModel:
    """`Class(model)` from `path/to/file.py:Class` or `package.module:Class`, as an `AdaptedModel`.

    Raises:
        FlipscopeError: the spec is malformed, the module or class cannot be found, or the class
            lacks `build` / `score`.
    """
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise FlipscopeError(f"--model-adapter {spec!r}: expected path/to/file.py:Class or package.module:Class")
    module = _import(module_name, spec)
    cls: Callable[..., Any] | None = getattr(module, class_name, None)
    if cls is None:
        raise FlipscopeError(f"--model-adapter {spec!r}: {module_name} has no {class_name}")
    missing = [m for m in ("build", "score") if not callable(getattr(cls, m, None))]
    if missing:
        raise FlipscopeError(
            f"--model-adapter {spec!r}: {class_name} lacks {', '.join(missing)} (see flipscope.model.adapter)"
        )
    return AdaptedModel(cls(model), model)


def _import(module_name: str, spec: str) -> Any:
    path = Path(module_name)
    if path.suffix == ".py":
        if not path.is_file():
            raise FlipscopeError(f"--model-adapter {spec!r}: file {module_name!r} does not exist")
        loader = importlib.util.spec_from_file_location(f"flipscope_adapter_{path.stem}", path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[loader.name] = module
        loader.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise FlipscopeError(f"--model-adapter {spec!r}: cannot import {module_name!r} ({err})") from err
