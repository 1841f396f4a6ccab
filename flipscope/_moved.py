"""Old import paths of the flat 0.1 layout, kept working for one release with a `DeprecationWarning`.

`import flipscope.patching` (and `from flipscope.patching import patch_bank`) still work: a finder
on `sys.meta_path` answers only for the module names in `MOVED`, building a module that holds the
public names of the modules they moved to. `flipscope.bootstrap` and the other old top-level
names resolve through `OLD_NAMES`. Nothing here imports torch until an old path is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "OLD_NAMES", "install_moved_modules", "warn_moved"]

MOVED: dict[str, tuple[str, ...]] = {
    "flipscope.answers": ("flipscope.model.answers",),
    "flipscope.clamp": (
        "flipscope.interventions.edited",
        "flipscope.interventions.hooks",
        "flipscope.experiments.clamping",
    ),
    "flipscope.demo": ("flipscope.reporting.demo",),
    "flipscope.evaluate": ("flipscope.experiments.summary",),
    "flipscope.fastpath": ("flipscope.model.kv",),
    "flipscope.features": (
        "flipscope.experiments.discovery",
        "flipscope.experiments.attribution",
        "flipscope.experiments.directions",
    ),
    "flipscope.flipbank": ("flipscope.data.flipbank", "flipscope.data.curation"),
    "flipscope.hook_table": ("flipscope.model.hook_names",),
    "flipscope.images": ("flipscope.model.images",),
    "flipscope.pairs": ("flipscope.experiments.pairs",),
    "flipscope.patching": (
        "flipscope.experiments.patching",
        "flipscope.experiments.sweeps",
        "flipscope.interventions.hooks",
        "flipscope.sae.encode",
    ),
    "flipscope.plots": ("flipscope.reporting.plots", "flipscope.reporting.files"),
    "flipscope.prompts": ("flipscope.model.prompts",),
    "flipscope.questions": ("flipscope.data.questions",),
    "flipscope.report": ("flipscope.reporting.report", "flipscope.reporting.format"),
    "flipscope.store": ("flipscope.data.store",),
    "flipscope.sweep": ("flipscope.experiments.evaluation", "flipscope.experiments.shards"),
    "flipscope.tiny": ("flipscope.model.tiny",),
}

OLD_NAMES: dict[str, str] = {
    **dict.fromkeys(("AnswerTokens", "ParsedAnswer", "binary_entropy", "p_yes", "parse_answer", "yes_no_margin"),
                    "flipscope.model.answers"),
    **dict.fromkeys(("IMAGE_CONDITIONS", "ModelInputs", "PromptBuilder"), "flipscope.model.prompts"),
    **dict.fromkeys(("BlankSpec", "blank_image", "load_image"), "flipscope.model.images"),
    **dict.fromkeys(("HookSite", "hook_sites"), "flipscope.model.hook_names"),
    **dict.fromkeys(("Estimate", "auc", "bh_qvalues", "bootstrap", "correlations", "mann_whitney"), "flipscope.stats"),
    **dict.fromkeys(("QUADRANTS", "flip_rate_cells", "question_table"), "flipscope.experiments.summary"),
    **dict.fromkeys(("CurationRules", "curate"), "flipscope.data.curation"),
    **dict.fromkeys(("check_flipbank_model", "save_flipbank"), "flipscope.data.flipbank"),
    **dict.fromkeys(("Question", "questions_from_table"), "flipscope.data.questions"),
    **dict.fromkeys(("PositionEncoding", "SAEEncoding", "encode_prompts", "encode_with_error"), "flipscope.sae.encode"),
    "check_sae": "flipscope.sae.load",
    "InterventionVLM": "flipscope.interventions.edited",
    **dict.fromkeys(("compare_clamped",), "flipscope.experiments.clamping"),
    **dict.fromkeys(("Discovery", "feature_table"), "flipscope.experiments.discovery"),
    "activation_by_family": "flipscope.experiments.directions",
    **dict.fromkeys(("PairActivations", "collect_pairs"), "flipscope.experiments.pairs"),
    **dict.fromkeys(("PatchResult", "recovery", "summarize_patch"), "flipscope.experiments.patching"),
    **dict.fromkeys(("layer_sweep", "patch_sweep"), "flipscope.experiments.sweeps"),
    "EvalConfig": "flipscope.experiments.evaluation",
    "merge_shards": "flipscope.experiments.shards",
    "DemoConfig": "flipscope.reporting.demo",
    "save_figures": "flipscope.reporting.files",
}  # fmt: skip


def warn_moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=3)


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return ModuleType(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        targets = MOVED[module.__name__]
        warn_moved(module.__name__, " and ".join(targets))
        names: list[str] = []
        for target in targets:
            source = importlib.import_module(target)
            for name in getattr(source, "__all__", ()):
                if name not in names:
                    setattr(module, name, getattr(source, name))
                    names.append(name)
        module.__all__ = names
        module.__doc__ = f"Deprecated alias of {', '.join(targets)}."


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader())


def install_moved_modules() -> None:
    """Put the finder for old module paths on `sys.meta_path` (once)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
