"""The package's shape: layers import only lower layers, modules and functions stay small, the
package and the CLI import nothing heavy, and old import paths still work (with a warning)."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "flipscope"
# each layer may import itself and the layers listed before it
LAYERS = ("errors", "stats", "data", "model", "sae", "interventions", "experiments", "organism", "reporting", "cli")
HEAVY = ("torch", "transformers", "transformer_lens", "sae_lens", "plotly", "pandas", "scipy")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "default" not in p.parts)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n.startswith("flipscope.")]


def test_lower_layers_never_import_higher_ones() -> None:
    wrong = []
    for path in _modules():
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = _layer(module)
        if own is None:
            continue
        for name in _imports(path):
            other = _layer(name)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(wrong)


def _doc_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def test_modules_and_functions_are_small() -> None:
    too_long = []
    for path in _modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1 - _doc_lines(node)
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize("statement", ["import flipscope", "import flipscope.cli", "import flipscope.data.store"])
def test_importing_the_package_and_the_command_loads_nothing_heavy(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert not loaded & set(HEAVY), f"{statement} imports {sorted(loaded & set(HEAVY))}"


def test_a_model_facing_name_loads_torch_on_first_use() -> None:
    assert "torch" in _loaded_after("import flipscope; flipscope.HookedVLM")


def test_command_help_answers_without_loading_a_model_stack() -> None:
    for args in (["--help"], ["evaluate", "--help"], ["patch", "--help"]):
        code = (
            "import sys; from flipscope.cli import main; sys.argv = ['flipscope', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', ' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r})))"
        )
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
        assert "Usage" in out
        assert out.rstrip().endswith("LOADED"), out.splitlines()[-1]


def test_old_import_paths_work_and_warn() -> None:
    import flipscope
    from flipscope.experiments.patching import patch_bank
    from flipscope.interventions.edited import ClampedVLM
    from flipscope.stats import bootstrap

    for name in ("flipscope.patching", "flipscope.clamp"):
        sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match="flipscope.patching moved to flipscope.experiments.patching"):
        import flipscope.patching as old_patching
    assert old_patching.patch_bank is patch_bank
    with pytest.warns(DeprecationWarning, match="flipscope.clamp moved"):
        import flipscope.clamp
    assert flipscope.clamp.ClampedVLM is ClampedVLM  # the module, no longer shadowed by a function
    with pytest.warns(DeprecationWarning, match="flipscope.bootstrap moved to flipscope.stats.bootstrap"):
        assert flipscope.bootstrap is bootstrap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flipscope.ClampedVLM is ClampedVLM  # an exported name does not warn
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flipscope.nope  # noqa: B018
    assert sorted(flipscope.__all__) == flipscope.__all__ and set(flipscope.__all__) <= set(dir(flipscope))
