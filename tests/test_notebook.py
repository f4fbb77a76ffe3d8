"""examples/lesson.ipynb, run top to bottom by a real Jupyter kernel (nbclient + ipykernel), as a learner runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "examples" / "lesson.ipynb"


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
