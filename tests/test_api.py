import subprocess
import sys

import pytest

import cnnlab


@pytest.mark.unit
def test_public_api_names_resolve():
    for name in cnnlab.__all__:
        assert getattr(cnnlab, name) is not None


def test_importing_the_package_does_not_load_torch():
    code = "import cnnlab, cnnlab.config, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_api_trains_and_reloads(tmp_path):
    config = cnnlab.load_config("perceptron", overrides=["epochs=1"], data={"dataset": "mnist-sample"})
    result = cnnlab.train(config, tmp_path, progress=False)
    model, classes, saved = cnnlab.load_model(result.run)
    assert saved == config and classes[3] == "3" and result.test.accuracy > 0.5


# ------------------------------------------------------------------------------ the notebook form
import types  # noqa: E402

from matplotlib.figure import Figure  # noqa: E402


@pytest.fixture(scope="module")
def keyword_run(tmp_path_factory):
    return cnnlab.train(model="seed", dataset="mnist-sample", epochs=1, dropout=0.4, threads=1,
                        root=tmp_path_factory.mktemp("runs"), name="kw", progress=False)


def test_keyword_train_reads_like_the_lesson(keyword_run):
    assert keyword_run.loaded.config.model.dense[0].dropout == 0.4 and len(keyword_run.history) == 1
    result = keyword_run.evaluate()
    assert result is keyword_run.test and result.accuracy > 0.5
    assert f"{result.accuracy:.4f}" in result._repr_html_()
    summary = keyword_run.summary()
    assert "693,962" in summary and "693,962" in summary._repr_html_()
    assert "mnist-sample" in keyword_run._repr_html_() and "kw" in keyword_run._repr_html_()
    shown = repr(keyword_run)  # one line in a terminal, not every test prediction
    assert shown.startswith("RunResult(run=") and f"test_accuracy={result.accuracy:.4f}" in shown
    assert len(shown) < 300 and "\n" not in shown


@pytest.mark.parametrize("picture", ["mistakes", "kernels", "confusion", "curves", "features"])
def test_run_pictures_are_inline_figures(keyword_run, picture):
    figure = getattr(keyword_run.show, picture)()
    assert isinstance(figure, Figure) and figure._repr_png_().startswith(b"\x89PNG")


def test_a_reopened_run_evaluates_as_its_test_did(keyword_run):
    again = cnnlab.open_run(keyword_run.run)
    assert again.test is None and again.evaluate().accuracy == pytest.approx(keyword_run.test.accuracy)


def test_a_test_index_predicts_as_the_docs_say_an_image_may_be_given(keyword_run):
    """docs/notebook.md: an image is a test index, a file or a PIL image; prediction(3) said "not a readable image"."""
    again = cnnlab.open_run(keyword_run.run)
    answer = again.predict(3)
    assert answer.probabilities.shape == (10,) and answer.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    test_image = cnnlab.load_dataset("mnist-sample", progress=False).test_images[3]
    expected = again.predictor.probabilities(test_image[None])[0]  # the model on test image 3, read directly
    assert answer.probabilities == pytest.approx(expected, abs=1e-6)
    assert isinstance(again.show.prediction(3), Figure)


@pytest.mark.unit
def test_a_preset_given_as_the_first_argument_is_pointed_to_model(tmp_path):
    with pytest.raises(cnnlab.ConfigError, match="a preset is named as model='seed'"):
        cnnlab.train("seed", epochs=1, root=tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
def test_an_unknown_keyword_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(cnnlab.UserError, match="'dropuot'; did you mean 'dropout'") as caught:
        cnnlab.train(model="seed", dataset="mnist-sample", dropuot=0.4, root=tmp_path)
    assert "\n" not in str(caught.value) and not list(tmp_path.iterdir())


def test_a_fake_kernel_gets_the_notebook_progress_updated_each_epoch(tmp_path, monkeypatch):
    from cnnlab.training import callbacks

    shown: list[object] = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append(obj)

    def display(obj, raw=False, display_id=False):
        shown.append(obj)
        return Handle()

    shell = types.SimpleNamespace(kernel=object())
    # version_info: matplotlib asks a loaded IPython's version the first time a figure is made in the process
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell, version_info=(9, 0)))
    monkeypatch.setitem(sys.modules, "IPython.display", types.SimpleNamespace(display=display))
    assert callbacks.in_notebook()
    chosen = callbacks.progress_display(lambda history: len(history))
    assert isinstance(chosen, callbacks.NotebookProgress)
    cnnlab.train(model="perceptron", dataset="mnist-sample", epochs=2, threads=1, root=tmp_path, callbacks=[chosen],
                 progress=False)
    assert [obj for obj in shown if isinstance(obj, int)] == [1, 2]  # the curves, redrawn after each epoch
    assert "epoch 2/2" in shown[-2]["text/plain"]
