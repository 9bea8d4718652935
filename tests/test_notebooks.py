"""Executes every notebook under notebooks/ and fails on any cell error.

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
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} is stored with outputs; clear them before committing")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=venv_kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
