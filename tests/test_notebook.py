"""examples/lesson.ipynb, run top to bottom by a real Jupyter kernel (nbclient + ipykernel), as a learner runs it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "examples" / "lesson.ipynb"


@pytest.mark.unit
def test_the_notebook_extra_the_docs_install_holds_jupyter_nbconvert_and_a_kernel():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    docs = (ROOT / "docs" / "notebook.md").read_text()
    named = set(re.findall(r"pip install -e '\.\[(\w+)\]'", docs)) | set(re.findall(r"cnnlab\[(\w+)\]", docs))
    assert named == {"notebook"}
    packages = {re.split(r"[<>=;\[ ]", requirement)[0] for requirement in extras["notebook"]}
    assert packages & {"jupyterlab", "notebook"} and {"nbconvert", "ipykernel"} <= packages
    assert "jupyter nbconvert --to notebook --execute examples/lesson.ipynb" in docs
    assert "notebook" not in extras["test"][0]  # the suite runs the notebook with nbclient, not JupyterLab


@pytest.mark.unit
def test_the_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code, "the lesson has code cells"
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


@pytest.mark.slow
def test_the_lesson_runs_in_a_jupyter_kernel_without_an_error(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="the notebook test needs: pip install -e '.[test]'")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on the first cell that fails.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [set().union(*(output.get("data", {}).keys() for output in cell.outputs)) for cell in code]
    assert all(kinds & {"image/png", "text/html"} for kinds in shown[:2]), "the playground's pictures show inline"
    training = next(kinds for cell, kinds in zip(code, shown) if "cnnlab.train(" in cell.source)
    assert "text/html" in training, "training shows its progress and the run's table"
    assert "image/png" in shown[-1], "the prediction on the photo is drawn"
    assert len(list((tmp_path / "runs").iterdir())) == 2  # the digits run and the clothes run
