"""`cnnlab predict` and `cnnlab export`: your own image files through a trained run, and the exported model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import load_dataset
from cnnlab.use.predict import Predictor, predict_arrays, predict_files, preview_strip
from use_runs import tiny_run

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits():
    return tiny_run("mnist-sample")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Test digits saved as a learner's files: a dark-on-light PNG, a JPEG photo, an RGBA drawing; plus bad files."""
    folder = tmp_path_factory.mktemp("pictures")
    images = load_dataset("mnist-sample", progress=False).test_images[:3]
    big = [Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC) for image in images]
    big[0].save(folder / "zero.png")
    big[1].convert("RGB").save(folder / "one.jpg", quality=90)
    drawing = Image.new("RGBA", (112, 112), (0, 0, 0, 0))
    drawing.putalpha(Image.fromarray(255 - np.asarray(big[2])))  # ink is opaque, paper transparent
    drawing.save(folder / "two.png")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_predict_prints_the_top_classes(digits, pictures):
    result = run("predict", digits, pictures / "zero.png", pictures / "one.jpg", "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{pictures / 'zero.png'}: {lines[1].split()[0]}"  # the best class is listed first
    assert len(lines) == 2 * 3 + 1 and all(line.strip().endswith(("%", "█")) for line in lines[1:3])
    assert lines[-1].startswith("predicted 2 files: ")
    assert result.stderr.startswith("backend: ")  # which backend ran the model (cnnlab.use.backends), said once


def test_predict_json_is_one_object_per_image(digits, pictures):
    files = [pictures / "zero.png", pictures / "one.jpg", pictures / "two.png"]
    result = run("predict", digits, *files, "--json")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["file"] for o in objects] == [str(f) for f in files]
    for o in objects:
        assert set(o) == {"file", "label", "class_name", "probabilities"}
        assert list(o["probabilities"]) == [str(d) for d in range(10)]
        assert abs(sum(o["probabilities"].values()) - 1) < 1e-5
        assert o["class_name"] == str(o["label"]) == max(o["probabilities"], key=o["probabilities"].get)


def test_predict_agrees_with_the_model_on_the_original_digits(digits, pictures):
    predictor = Predictor.from_run(digits)
    originals = load_dataset("mnist-sample", progress=False).test_images[:3]
    expected = predictor.probabilities(originals).argmax(axis=1)
    got = predict_files(predictor, [pictures / "zero.png", pictures / "one.jpg", pictures / "two.png"])
    assert sum(p.label == e for p, e in zip(got.predictions, expected)) >= 2


def test_bad_files_are_reported_and_the_rest_still_predicted(digits, pictures, tmp_path):
    result = run("predict", digits, pictures / "notes.txt", pictures / "zero.png", pictures / "empty.png",
                 tmp_path / "missing.png", "--json")
    assert result.exit_code == 1
    assert [json.loads(line)["file"] for line in result.stdout.splitlines()] == [str(pictures / "zero.png")]
    backend, *errors = result.stderr.splitlines()
    notes, empty = pictures / "notes.txt", pictures / "empty.png"
    assert backend.startswith("backend: ")
    assert errors == [
        f"error: {notes}: not a readable image (cannot identify image file '{notes}')",
        f"error: {empty}: not a readable image (cannot identify image file '{empty}')",
        f"error: {tmp_path / 'missing.png'}: no such file",
        "predicted 1 file; 3 unreadable (listed above): " + json.loads(result.stdout)["class_name"] + " 1",
    ]
    assert "Traceback" not in result.output


def test_preview_shows_what_the_model_saw(digits, pictures, tmp_path):
    out = tmp_path / "seen.png"
    result = run("predict", digits, pictures / "zero.png", pictures / "one.jpg", "--preview", out)
    assert result.exit_code == 0 and f"saved {out}" in result.output
    preview = np.asarray(Image.open(out))
    assert preview.shape == (2 + 28 * 4 + 2, 2 + 2 * (28 * 4 + 2))  # two 4x-enlarged 28x28 images, 2 px gaps
    assert run("predict", digits, pictures / "zero.png", "--preview", tmp_path / "x.jpg").exit_code == 2


@pytest.mark.unit
def test_predict_needs_a_run(tmp_path, pictures):
    result = run("predict", tmp_path / "nowhere", pictures / "zero.png")
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_clothing_runs_use_their_own_recipe_and_class_names(tmp_path):
    predictor = Predictor.from_run(tiny_run("fashion-mnist-sample"))
    assert predictor.recipe == "objects"
    item = load_dataset("fashion-mnist-sample", progress=False).test_images[0]  # an ankle boot
    photo = Image.fromarray(255 - item).resize((280, 280), Image.Resampling.BICUBIC).convert("RGB")
    (prediction,) = predict_arrays(predictor, np.asarray(photo)[None], ["boot.jpg"])
    assert set(prediction.to_dict()["probabilities"]) >= {"Ankle boot", "Sneaker", "T-shirt/top"}
    assert prediction.image.shape == (28, 28) and prediction.image[0].max() == 0


@pytest.mark.unit
def test_preview_strip_grid():
    strip = preview_strip([np.full((28, 28), 255, np.uint8)] * 12, columns=5, scale=2, gap=1)
    assert strip.shape == (1 + 3 * 57, 1 + 5 * 57)


# -------------------------------------------------------------------------------------- export
def test_export_onnx_matches_the_model_under_onnxruntime(digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "digits.onnx"
    result = run("export", digits, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.output
    assert "checked with onnxruntime on 64 images: max abs difference" in result.output
    predictor = Predictor.from_run(digits)
    images = load_dataset("mnist-sample", progress=False).test_images[100:103]  # any batch size works
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"image": images[:, None].astype(np.float32) / 255})[0]
    assert np.abs(exported - predictor.probabilities(images)).max() < 1e-5
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)] and meta["recipe"] == "digits"


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_export_torchscript_matches_the_model(digits, tmp_path):
    result = run("export", digits, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    files = {"metadata.json": ""}
    loaded = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=files)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), Predictor.from_run(digits).model.predict_proba(x), atol=1e-6)
    assert json.loads(files["metadata.json"])["dataset"] == "mnist-sample"


def test_export_refuses_unknown_formats(digits):
    result = run("export", digits, "--format", "pickle")
    assert result.exit_code == 2 and "pickle" in result.output


@pytest.mark.parametrize("command", [
    ["export", "{run}", "--format", "onnx", "--out", "{run}/model.safetensors"],  # not an .onnx name
    ["export", "{run}", "--format", "onnx", "--out", "{run}/inference.onnx"],  # the run's own ONNX cache
    ["export", "{run}", "--format", "torchscript", "--out", "{tmp}/picture.png"],
    ["predict", "{run}", "{pictures}", "--out", "{run}/predictions.csv"],  # the run's test predictions
])
def test_an_output_never_replaces_a_run_s_own_files_or_takes_another_format_s_name(digits, pictures, tmp_path,
                                                                                   command):
    run_copy = shutil.copytree(digits, tmp_path / "run")
    (tmp_path / "picture.png").write_bytes(b"a picture")
    before = {f.name: f.read_bytes() for f in run_copy.iterdir() if f.is_file()}
    result = run(*[part.format(run=run_copy, tmp=tmp_path, pictures=pictures) for part in command])
    assert result.exit_code == 2, result.output
    assert result.output.count("error: --out") == 1 and "Traceback" not in result.output
    assert {f.name: f.read_bytes() for f in run_copy.iterdir() if f.is_file()} == before
    assert (tmp_path / "picture.png").read_bytes() == b"a picture"


def test_max_drop_without_quantize_is_refused(digits):
    result = run("export", digits, "--max-drop", "1")
    assert result.exit_code == 2 and "--max-drop: only with --quantize" in result.output


def test_an_empty_folder_beside_a_file_is_one_error_line_and_the_file_is_still_predicted(digits, pictures, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("predict", digits, tmp_path / "empty", pictures / "zero.png")
    assert result.exit_code == 1, result.output  # something named on the command line could not be read
    assert f"error: {tmp_path / 'empty'}: no image files in this folder" in result.output
    assert f"{pictures / 'zero.png'}: " in result.output and "predicted 1 file" in result.output


def test_a_sub_folder_that_cannot_be_listed_is_reported_not_skipped(digits, pictures, tmp_path, monkeypatch):
    import os

    shutil.copytree(pictures, tmp_path / "walk" / "ok")
    (tmp_path / "walk" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):  # as for a folder of mode 000 (the suite may run as root)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = run("predict", digits, tmp_path / "walk")
    assert f"error: {tmp_path / 'walk' / 'locked'}: cannot list this folder: Permission denied" in result.output
    summary = next(line for line in result.output.splitlines() if line.startswith("predicted"))
    assert "2 unreadable" in summary, result.output  # the locked folder and the empty file


def test_a_model_whose_output_overflows_says_so_instead_of_naming_class_0(digits, pictures, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cnnlab.use.serve import create_app
    from use_runs import running_server

    spiked = shutil.copytree(digits, tmp_path / "run", ignore=shutil.ignore_patterns("inference.onnx*"))
    with safe_open(str(spiked / "model.safetensors"), "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for key in tensors:
        if key.endswith("weight"):
            tensors[key] = tensors[key] * 1e20  # finite weights whose products overflow to inf, then NaN
    save_file(tensors, str(spiked / "model.safetensors"), metadata=metadata)
    result = run("predict", spiked, pictures / "zero.png", "--json", "--backend", "torch")
    assert result.exit_code == 2, result.output
    assert "the model's output is not a number (NaN or infinite) for 1 of 1 pictures" in result.output
    import httpx

    with running_server(create_app([spiked])) as url:
        answer = httpx.post(f"{url}/api/predict", files={"file": ("d.png", (pictures / "zero.png").read_bytes())})
    assert answer.status_code == 500 and "not a number" in answer.json()["error"]
