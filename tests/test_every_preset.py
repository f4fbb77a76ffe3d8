"""Every preset, residual ones included, through every part of cnnlab (timm's loop over all its models is the
model for this): train an epoch, then show (calibration, feature map and first batch too), report, explain with
a learned kernel, predict, export, serve."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import list_presets, load_config
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from conftest import StopAt

runner = CliRunner()
DIGIT = Path(__file__).resolve().parents[1] / "docs" / "img" / "digit.png"
SHORT = ["epochs=1", "batch_size=128", "data.val_size=500"]  # torch threads: the test process's
# every preset on the digits, and the presets whose `datasets:` block builds another network on the clothes
CASES = {**{name: (name, []) for name in list_presets()},
         "fast on fashion-mnist": ("fast", ["data.dataset=fashion-mnist-sample"])}  # a whitening first layer


def cli(*args: str) -> str:
    """What `cnnlab ARGS` prints on stdout (stderr holds notes, such as which backend ran the model)."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"cnnlab {' '.join(args)}:\n{result.output}"
    return result.stdout


def train_case(case: str, root: Path) -> Path:
    """An epoch of the case's preset: the run every command below reads (and none writes into)."""
    name, more = CASES[case]
    return pipeline.train(load_config(name, overrides=[*SHORT, *more]), root, name=case.replace(" ", "-"),
                          progress=False).run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_preset_works_in_every_command(tmp_path, name):
    run = train_case(name, tmp_path / "runs")
    model, classes, _ = load_model(run)
    convs = list(model.conv_layers())
    out = tmp_path / "out"
    out.mkdir()
    cli("evaluate", str(run), "--json")
    if convs:
        cli("show", "kernels", str(run), "--layer", convs[-1], "--out", str(out / "k.png"))
        cli("show", "features", str(run), "--index", "0", "--out", str(out / "f.png"))
        cli("explain", "conv", str(DIGIT), "--kernel", f"{run}:{convs[0]}:0", "--steps", "2",
            "--out", str(out / "e.gif"))
    cli("show", "saliency", str(run), "--index", "0", "--out", str(out / "s.png"))
    cli("show", "mistakes", str(run), "--out", str(out / "m.png"))
    cli("show", "calibration", str(run), "--out", str(out / "c.png"))
    assert "penultimate" in cli("show", "embedding", str(run), "--images", "200", "--out", str(out / "map.png"))
    cli("show", "batch", str(run), "--out", str(out / "b.png"))
    cli("report", str(run), "--out", str(out / "r.html"))
    cli("explore", str(run), "--out", str(out / "x.html"))
    predicted = json.loads(cli("predict", str(run), str(DIGIT), "--json").splitlines()[0])
    assert set(predicted["probabilities"]) == set(classes)
    exported = cli("export", str(run), "--format", "onnx", "--out", str(out / "m.onnx"))
    assert "checked with onnxruntime" in exported
    from fastapi.testclient import TestClient

    from cnnlab.use.serve import create_app

    with TestClient(create_app([run]), base_url="http://localhost") as client:
        answer = client.post("/api/predict?details=true", files={"file": ("d.png", DIGIT.read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    rows = model.feature_maps(torch.zeros(1, 1, 28, 28))
    assert [panel["layer"] for panel in answer.json()["feature_maps"]] == [row.name for row in rows]


@pytest.mark.slow
def test_a_residual_run_resumes_bitwise_equal(tmp_path):
    config = load_config("resnet", overrides=[*SHORT, "epochs=2", "train.ema=0.9"])
    whole = pipeline.train(config, tmp_path, name="whole", progress=False).run
    with pytest.raises(pipeline.TrainingInterrupted):
        pipeline.train(config, tmp_path, name="cut", callbacks=[StopAt(epoch=2, step=9)], progress=False)
    resumed = pipeline.resume(tmp_path / "cut", progress=False).run
    a, b = load_checkpoint(whole)[0], load_checkpoint(resumed)[0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (whole / "test.json").read_text() == (resumed / "test.json").read_text()


@pytest.mark.slow
def test_a_residual_model_in_a_sweep_and_data_parallel(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: grid\nmodel: resnet\ndataset: mnist-sample\nset: {epochs: 1, batch_size: 256, "
                     "blocks: 1}\nparameters:\n  widen:\n    values: [1, 2]\n")
    cli("sweep", "run", str(sweep), "--trials", "2", "--runs-dir", str(tmp_path / "runs"))
    status = cli("sweep", "status", "sweep", "--runs-dir", str(tmp_path / "runs"))
    assert "2 complete" in status
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--model", "resnet", "--set", "blocks=1",
                           "--epochs", "1", "--batch-size", "256", "--nproc", "2", "--quiet", "--runs-dir", "runs",
                           "--name", "ddp"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "runs" / "ddp" / "test.json").is_file()
