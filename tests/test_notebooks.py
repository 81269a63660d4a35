"""The notebooks: committed without outputs, parameters in their first code cell, and each runs top
to bottom on the generated demo data.

They are executed here with nbclient (so plain ``python -m pytest`` runs them; ``pytest --nbmake
notebooks/`` works too) in a kernel on *this* interpreter: a ``python3`` kernelspec naming
``sys.executable`` is put first on ``JUPYTER_PATH``, so a user-level ``python3`` kernel of another
environment cannot be picked up. The kernel gets the repository on ``PYTHONPATH`` (no install needed),
one CPU thread, and a private ``$MGFF_CACHE_DIR`` and ``$TMPDIR`` (the demo data and runs go there).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["01_explore_dataset.ipynb", "02_attention_and_crops.ipynb", "03_error_analysis.ipynb"]
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 300


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL_NAME
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_come_first_as_plain_assignments(name):
    """The first code cell is tagged ``parameters`` (papermill's convention) and only binds names to
    literals, so a caller can replace it; every path parameter defaults to ``None`` (demo data)."""
    first = next(cell for cell in read(name).cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    statements = ast.parse(first.source).body
    assert statements and all(isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) for s in statements)
    values = {s.targets[0].id: s.value.value for s in statements}
    paths = [k for k in values if k.endswith(("_ROOT", "_CSV", "CHECKPOINT", "CONFIG", "_DIR"))]
    assert paths and all(values[k] is None for k in paths)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment of the notebook kernels: this interpreter's kernelspec first on JUPYTER_PATH,
    the repository importable, one thread, private cache and temp folders."""
    root = tmp_path_factory.mktemp("notebook-kernels")
    spec_dir = root / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    (root / "tmp").mkdir()
    paths = lambda *p: os.pathsep.join(str(x) for x in p if x)  # noqa: E731
    env = {
        "JUPYTER_PATH": paths(root / "jupyter", os.environ.get("JUPYTER_PATH")),
        "PYTHONPATH": paths(REPO, os.environ.get("PYTHONPATH")),
        "MGFF_CACHE_DIR": str(root / "cache"),
        "TMPDIR": str(root / "tmp"),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # the debugger's warning on frozen modules
    }
    return env


def execute(nb: nbformat.NotebookNode, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    return client.execute()


def test_kernel_runs_this_interpreter(kernel_env, monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, mgff; print(sys.executable)")])
    executed = execute(nb, kernel_env, monkeypatch)
    assert executed.cells[0].outputs[0].text.strip() == sys.executable


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, kernel_env, monkeypatch):
    executed = execute(read(name), kernel_env, monkeypatch)  # raises CellExecutionError naming the cell
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    figures = sum(1 for cell in code for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))
    expected = {"01_explore_dataset.ipynb": 4, "02_attention_and_crops.ipynb": 5, "03_error_analysis.ipynb": 3}
    assert figures == expected[name]
    # nothing was written next to the notebooks
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir() if not p.name.startswith(".")) == NOTEBOOKS
