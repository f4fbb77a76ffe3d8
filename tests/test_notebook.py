"""examples/lesson.ipynb, run top to bottom by a real Jupyter kernel (nbclient + ipykernel), as a learner runs it.

The suite runs it on the shipped samples (CNNLAB_LESSON=sample: the notebook's parameters cell switches every
dataset to its sample), then checks each claim the lesson's text makes against what the cell under it printed.
"""
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
    assert "CNNLAB_LESSON=sample jupyter" in docs  # the offline way is in the docs too
    assert "notebook" not in extras["test"][0]  # the suite runs the notebook with nbclient, not JupyterLab


@pytest.mark.unit
def test_the_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code, "the lesson has code cells"
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


def test_one_parameters_cell_chooses_the_data_and_the_sample_switch_reaches_every_run():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    parameters = [cell for cell in cells if "parameters" in cell["metadata"].get("tags", [])]
    assert len(parameters) == 1
    assert 'os.environ.get("CNNLAB_LESSON") == "sample"' in "".join(parameters[0]["source"])
    training = [src for cell in cells if cell["cell_type"] == "code"
                for src in re.findall(r"cnnlab\.train\(.*?\)\n", "".join(cell["source"]) + "\n", re.S)]
    assert len(training) >= 5
    for call in training:  # no dataset named in a training cell: each reads the parameters cell's choice
        assert re.search(r"dataset=(DIGITS|CLOTHES),", call) and "**SETTINGS" in call, call


# ------------------------------------------------------------------------- the lesson, run on the samples
@pytest.fixture(scope="module")
def lesson(tmp_path_factory):
    """The notebook executed on the samples in an empty folder: (executed notebook, that folder)."""
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="the notebook test needs: pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp("lesson")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("CNNLAB_LESSON", "sample")
        env.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        env.delenv("CNNLAB_DATA", raising=False)
        # Raises CellExecutionError, with the cell and its traceback, on the first cell that fails.
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    return notebook, folder


def tagged(notebook, tag: str):
    [cell] = [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]
    return cell


def printed(notebook, tag: str) -> str:
    """What the cell tagged `tag` printed (stdout)."""
    return "".join(out.text for out in tagged(notebook, tag).outputs if out.get("name") == "stdout")


def shown(cell) -> set[str]:
    """The kinds of rich output a cell displayed (image/png, text/html, ...)."""
    return set().union(*(output.get("data", {}).keys() for output in cell.outputs))


def text_before(notebook, tag: str) -> str:
    index = notebook.cells.index(tagged(notebook, tag))
    return notebook.cells[index - 1].source


def percent(text: str) -> float:
    return float(text.rstrip("%"))


@pytest.mark.slow
def test_the_playground_pictures_training_progress_and_the_photo_show_inline(lesson):
    notebook, folder = lesson
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    playground = [cell for cell in code if "conv_figure(" in cell.source or "explain_" in cell.source]
    assert len(playground) >= 3 and all(shown(cell) & {"image/png", "text/html"} for cell in playground)
    training = [cell for cell in code if "cnnlab.train(" in cell.source and "progress=False" not in cell.source]
    assert len(training) == 4 and all("text/html" in shown(cell) for cell in training), \
        "each training shows its progress and the run"
    assert "image/png" in shown(code[-1]), "the prediction on the photo is drawn"
    runs = {run.name.split("-20")[0] for run in (folder / "runs").iterdir() if run.name != "sweep"}
    assert runs == {"mnist-sample-seed", "mnist-sample-deep", "fashion-mnist-sample-seed"}
    assert len(list((folder / "runs").glob("*seed*"))) == 3  # the lesson's, with dropout, the clothes'
    assert len(list((folder / "runs" / "sweep").iterdir())) == 6


@pytest.mark.slow
def test_the_first_cnn_is_the_network_its_text_describes_and_gets_above_90_percent(lesson):
    notebook, _ = lesson
    text = text_before(notebook, "summary-seed")
    summary = "".join(out.get("data", {}).get("text/plain", "") for out in tagged(notebook, "summary-seed").outputs)
    dense = re.findall(r"Dense\((\d+)\)", text)
    assert dense == ["128", "10"]
    assert re.search(r"fc1 \(Dense, relu\)\s+\(128,\)", summary) and re.search(r"classifier .*\(10,\)", summary)
    assert "No dropout yet" in text and "Dropout" not in summary
    assert "well above 90%" in text_before(notebook, "claim-first-cnn")
    accuracy, images = re.fullmatch(r"([\d.]+%) of ([\d,]+) test images right\n", printed(notebook, "claim-first-cnn")
                                    ).groups()
    assert percent(accuracy) > 90 and images == "1,000"


@pytest.mark.slow
def test_without_dropout_training_runs_further_ahead_of_validation_than_with_it(lesson):
    notebook, _ = lesson
    rows = {label: [percent(value) for value in values.split()] for label, values in
            re.findall(r"^(no dropout|dropout 0\.4)\s+(.+)$", printed(notebook, "claim-dropout"), re.M)}
    (train, val, gap, test), (d_train, d_val, d_gap, d_test) = rows["no dropout"], rows["dropout 0.4"]
    assert gap == pytest.approx(train - val, abs=0.011) and d_gap == pytest.approx(d_train - d_val, abs=0.011)
    # the text: "Without dropout the training accuracy runs ahead of the validation accuracy ... With dropout
    # [it] no longer runs ahead; it even stays below the validation accuracy"
    assert gap > 0 and d_gap < 0
    assert abs(test - d_test) < 1  # "the two test accuracies are within a percentage point of each other"
    assert "image/png" in shown(tagged(notebook, "claim-dropout")), "the two runs' curves are drawn"


@pytest.mark.slow
def test_the_deeper_network_beats_the_lessons_in_fewer_epochs(lesson):
    notebook, _ = lesson
    rows = re.findall(r"^(seed|deep) .*?(\d+) epochs\s+test accuracy ([\d.]+)%$", printed(notebook, "claim-deeper"),
                      re.M)
    (_, seed_epochs, seed), (_, deep_epochs, deep) = rows
    assert int(deep_epochs) < int(seed_epochs) and float(deep) > float(seed)


@pytest.mark.slow
def test_the_sweeps_slowest_learning_rate_comes_last_and_its_best_is_the_top_row(lesson):
    notebook, _ = lesson
    out = printed(notebook, "claim-sweep")
    rows = re.findall(r"^lr (\S+)\s+filters\s+(\d+)\s+val accuracy ([\d.]+)%$", out, re.M)
    assert len(rows) == 6 and [float(r[2]) for r in rows] == sorted((float(r[2]) for r in rows), reverse=True)
    assert {float(lr) for lr, _, _ in rows[-2:]} == {1e-4}  # both 1e-4 trials last, whatever the filters
    lr, filters, _ = rows[0]
    assert f"best: lr {lr} with {filters} filters" in out


@pytest.mark.slow
def test_shirts_are_the_hardest_clothes_and_the_photo_is_trousers(lesson):
    notebook, _ = lesson
    out = printed(notebook, "claim-clothes")
    hardest = re.search(r"^hardest: (.+)$", out, re.M).group(1)
    easiest = re.search(r"^easiest: (.+)$", out, re.M).group(1)
    assert hardest.startswith("Shirt ")
    # the text: "Trousers, bags and shoes are easy"
    assert {re.sub(r" \d+%$", "", name) for name in easiest.split(", ")} <= {"Trouser", "Bag", "Sandal", "Sneaker",
                                                                            "Ankle boot"}
    top = printed(notebook, "claim-photo").splitlines()
    assert len(top) == 3 and top[0].split()[0] == "Trouser" and percent(top[0].split()[1]) > 50
