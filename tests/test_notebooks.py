"""Notebooks under notebooks/: committed with their outputs, and they execute.

The fast test checks that every code cell of every committed notebook has
outputs (the notebooks are stored executed, figures embedded as image/png, so
they read well on GitHub; re-execute and write them back after editing). The
slow test executes each notebook and fails on any cell error; it runs an
in-memory copy and never writes the notebook back.

Each notebook runs top to bottom in a fresh `python3` kernel with
`MPLBACKEND=Agg`, in a temporary working directory so files it writes do not
land in the repository. The kernel is the interpreter running pytest (the
project's venv), whatever kernelspecs the user has installed: a `python3`
kernelspec for `sys.executable` is put first on JUPYTER_PATH. New notebooks
are picked up automatically.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_found():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_committed(path):
    """Stored executed top to bottom (execution counts 1..n), with outputs and no errors.

    A code cell that prints nothing (imports) has no outputs, so each cell is checked
    for its execution count and the notebook as a whole for outputs.
    """
    notebook = nbformat.read(path, as_version=4)
    code = [(i, c) for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    counts = [c.get("execution_count") for _, c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: code cells are not stored executed top to bottom (execution counts "
        f"{counts}); execute the notebook and commit it with its outputs")
    assert any(c.get("outputs") for _, c in code), f"{path.name}: stored without outputs"
    errors = [i for i, c in code if any(o.get("output_type") == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: cells {errors} are stored with an error output"


@pytest.fixture
def venv_kernel(tmp_path_factory, monkeypatch):
    """A `python3` kernelspec running this interpreter, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fedjax_pfl tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel process
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, venv_kernel):
    notebook = nbformat.read(path, as_version=4)  # executed in memory, not written back
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=venv_kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
