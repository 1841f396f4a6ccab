"""The exploration notebook runs top to bottom, is committed without outputs, and matches its script."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ANALYSES = Path(__file__).parents[1] / "analyses"


def test_notebook_is_paired_and_committed_without_outputs() -> None:
    notebook = nbformat.read(ANALYSES / "explore_flip.ipynb", as_version=4)
    script = jupytext.read(ANALYSES / "explore_flip.py")
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [(c.cell_type, c.source) for c in script.cells]


def test_notebook_executes_top_to_bottom(tmp_path: Path) -> None:
    notebook = nbformat.read(ANALYSES / "explore_flip.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ANALYSES)}}
    ).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "answer restored: True" in text  # the patch undid this flip
    assert "recovery" in text and "clamped margins" in text and "film's share of the margin" in text
    assert "at the last position, where the answer is read, the paraphrase raises it" in text  # the framing feature
