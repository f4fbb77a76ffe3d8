"""Inference backends (`cnnlab.use.backends`): onnxruntime answers as torch does, the run's cached ONNX file is
used only while it matches the run's weights, and `export --quantize int8` writes nothing past --max-drop."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import load_dataset
from cnnlab.runs.layout import path
from cnnlab.runs.weights import load_model, save_weights
from cnnlab.use import quantize
from cnnlab.use.backends import OnnxBackend, TorchBackend, cached_backend
from cnnlab.use.export import TOLERANCE
from cnnlab.use.predict import Predictor
from use_runs import tiny_run

ort = pytest.importorskip("onnxruntime")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A copy of the tiny digits run whose ONNX cache is made (once for the module)."""
    copy = tmp_path_factory.mktemp("runs") / "digits"
    # without the ONNX file another test's predict may have cached in the shared run
    shutil.copytree(tiny_run("mnist-sample"), copy, ignore=shutil.ignore_patterns("inference.onnx*"))
    choice = Predictor.from_run(copy).use_backend("onnx")
    assert choice.backend.name == "onnx" and "made now" in choice.line(), choice.line()
    return copy


@pytest.fixture
def fresh(cached, tmp_path):
    """The cached run copied again, for a test that changes it."""
    return shutil.copytree(cached, tmp_path / "digits")


def sample_images(count: int = 50) -> np.ndarray:
    return load_dataset("mnist-sample", progress=False).test_images[:count]


def test_the_backends_give_the_same_answers(cached):
    torch_predictor, onnx_predictor = Predictor.from_run(cached), Predictor.from_run(cached)
    choice = onnx_predictor.use_backend("auto")
    assert choice.line() == f"backend: onnx (onnxruntime {ort.__version__}, cached {path(cached, 'inference_onnx')})"
    images = sample_images()
    expected, actual = torch_predictor.probabilities(images), onnx_predictor.probabilities(images)
    assert isinstance(torch_predictor.backend, TorchBackend) and isinstance(onnx_predictor.backend, OnnxBackend)
    assert actual.shape == expected.shape == (50, 10) and np.abs(actual - expected).max() <= TOLERANCE
    assert (actual.argmax(1) == expected.argmax(1)).all()


def test_predict_says_which_backend_ran(cached, tmp_path):
    from PIL import Image

    picture = tmp_path / "seven.png"
    Image.fromarray(255 - sample_images(1)[0]).save(picture)
    answers = {}
    for backend in ("torch", "onnx"):
        result = run("predict", cached, picture, "--json", "--backend", backend)
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines()[0].startswith(f"backend: {backend} (")
        answers[backend] = json.loads(result.stdout)
    assert answers["torch"]["label"] == answers["onnx"]["label"]
    assert np.allclose(list(answers["torch"]["probabilities"].values()),
                       list(answers["onnx"]["probabilities"].values()), atol=TOLERANCE)


def flip_one_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def retrain(run) -> torch.nn.Module:
    """New weights in the run, as a resumed or repeated training leaves them."""
    model, classes, _ = load_model(run)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_weights(run, model, classes)
    return model


@pytest.mark.parametrize("change, reason", [
    (lambda run: retrain(run), "the run's weights changed since it was made"),
    (lambda run: flip_one_byte(path(run, "inference_onnx")), "inference.onnx is not the file that was made"),
    (lambda run: path(run, "inference_onnx").write_bytes(path(run, "inference_onnx").read_bytes()[:500]),
     "inference.onnx is not the file that was made (changed or cut short)"),
    (lambda run: path(run, "inference_onnx_record").write_text("{"), "unreadable (JSONDecodeError"),
    (lambda run: path(run, "inference_onnx_record").unlink(), "missing"),
    (lambda run: path(run, "inference_onnx").unlink(), "missing"),
])
def test_a_cache_that_does_not_match_the_run_is_not_used(fresh, change, reason):
    change(fresh)
    found = cached_backend(load_model(fresh)[0], fresh)
    assert isinstance(found, str) and found.startswith(reason), found


def test_a_cache_whose_record_was_made_to_match_is_caught_by_its_answers(fresh):
    """Another model's file with a record rewritten for it: the digests agree, the answers do not."""
    onnx = pytest.importorskip("onnx")
    file, record_file = path(fresh, "inference_onnx"), path(fresh, "inference_onnx_record")
    proto = onnx.load(str(file))
    weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weights) * 1.5
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    onnx.save(proto, str(file))
    record = json.loads(record_file.read_text())
    record["onnx_sha256"] = __import__("hashlib").sha256(file.read_bytes()).hexdigest()
    record_file.write_text(json.dumps(record))
    found = cached_backend(load_model(fresh)[0], fresh)
    assert isinstance(found, str) and found.startswith("its answers differ from the model's by"), found


def test_a_retrained_run_gets_its_onnx_file_made_again(fresh):
    retrained = retrain(fresh)
    before = path(fresh, "inference_onnx").read_bytes()
    predictor = Predictor.from_run(fresh)
    choice = predictor.use_backend("auto")
    assert choice.backend.name == "onnx"
    assert "made again: the run's weights changed since it was made" in choice.line(), choice.line()
    assert path(fresh, "inference_onnx").read_bytes() != before
    images = sample_images()
    with torch.inference_mode():
        expected = retrained.eval().predict_proba(torch.from_numpy(images[:, None] / np.float32(255))).numpy()
    assert np.abs(predictor.probabilities(images) - expected).max() <= TOLERANCE
    assert isinstance(cached_backend(predictor.model, fresh), OnnxBackend)  # the new file is the cache now


def test_a_run_folder_that_cannot_hold_the_file_gets_one_for_the_session(fresh, monkeypatch):
    from cnnlab.use import backends

    for key in ("inference_onnx", "inference_onnx_record"):
        path(fresh, key).unlink()

    def read_only(predictor, run):
        raise PermissionError(13, "Permission denied", str(path(run, "inference_onnx")))

    monkeypatch.setattr(backends, "build_cache", read_only)
    predictor = Predictor.from_run(fresh)
    choice = predictor.use_backend("onnx")
    assert choice.backend.name == "onnx" and "made for this session only: could not cache it" in choice.line()
    assert not path(fresh, "inference_onnx").exists()
    images = sample_images()
    expected = TorchBackend(predictor.model)
    assert np.abs(predictor.probabilities(images) - expected.probabilities(images[:, None] / np.float32(255))
                  ).max() <= TOLERANCE


def test_ctrl_c_while_the_onnx_file_is_made_stops_instead_of_falling_back(fresh, monkeypatch):
    """torch's exporter catches the KeyboardInterrupt it meets and raises its own error from it; auto must not
    take that for 'onnx unavailable' and carry on in torch."""
    for key in ("inference_onnx", "inference_onnx_record"):
        path(fresh, key).unlink()

    def exporter_seeing_ctrl_c(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("Failed to export the model with torch.export.") from interrupt

    monkeypatch.setattr(torch.onnx, "export", exporter_seeing_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        Predictor.from_run(fresh).use_backend("auto")
    assert not path(fresh, "inference_onnx_record").exists()


def test_without_onnxruntime_auto_falls_back_to_torch_and_onnx_refuses(cached, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    choice = Predictor.from_run(cached).use_backend("auto")
    assert choice.backend.name == "torch"
    assert choice.line() == ("backend: torch (onnx unavailable: exporting to ONNX needs onnxruntime: "
                             "pip install 'cnnlab[export]')")
    result = run("predict", cached, "nothing.png", "--backend", "onnx")
    assert result.exit_code == 2 and "needs onnxruntime: pip install 'cnnlab[export]'" in result.output
    assert "Traceback" not in result.output


def test_serve_runs_the_chosen_backend(cached):
    from cnnlab.use.serve import create_app

    application = create_app([cached], backend="onnx")
    (name, line), = application.state.backend_lines.items()
    assert name == "digits" and line.startswith("backend: onnx (")


# -------------------------------------------------------------------------------------------- int8
def test_export_int8_reports_size_accuracy_and_latency(cached, tmp_path):
    out = tmp_path / "digits.int8.onnx"
    result = run("export", cached, "--quantize", "int8", "--max-drop", "100", "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"saved {out}"
    assert lines[1].startswith("size: ") and "float32" in lines[1]
    assert lines[2].startswith("test accuracy: ") and "on 1,000 test images" in lines[2]
    assert lines[3].startswith("batch-1 latency: ") and lines[4] == "calibrated on 512 training images"
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert out.stat().st_size < path(cached, "inference_onnx").stat().st_size
    assert json.loads(int8.get_modelmeta().custom_metadata_map["classes"]) == [str(d) for d in range(10)]
    images = sample_images(200)
    float_answers = Predictor.from_run(cached).probabilities(images)
    int8_answers = int8.run(None, {"image": images[:, None].astype(np.float32) / 255})[0]
    assert (int8_answers.argmax(1) == float_answers.argmax(1)).mean() > 0.9  # int8 rounds, it does not relearn


def test_an_int8_model_past_the_allowed_drop_is_not_written(cached, tmp_path, monkeypatch):
    measured = []

    def int8_worse(session, x, labels):  # float32 is measured first, then int8: make int8 lose 2 points
        measured.append(real_accuracy(session, x, labels) - (0.02 if measured else 0.0))
        return measured[-1]

    real_accuracy = quantize.accuracy
    monkeypatch.setattr(quantize, "accuracy", int8_worse)
    out = tmp_path / "kept" / "model.int8.onnx"
    out.parent.mkdir()
    result = run("export", cached, "--quantize", "int8", "--max-drop", "1.5", "--out", out)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and message.startswith(f"error: {out}: the int8 model's test accuracy")
    assert "2.00 points below float32's" in message and "more than --max-drop 1.5; nothing was written" in message
    assert list(out.parent.iterdir()) == []  # no file, no temporary one


def test_quantize_refuses_another_format(cached):
    result = run("export", cached, "--quantize", "int8", "--format", "torchscript")
    assert result.exit_code == 2 and "--quantize needs --format onnx" in result.output
