"""The CLI through Typer's runner: the commands a user types, and their errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from use_runs import tiny_run

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.unit
def test_summary_prints_the_lessons_table():
    result = run("summary", "--model", "seed")
    assert result.exit_code == 0
    assert "(26, 26, 32)" in result.output and "Total params: 693,962" in result.output


@pytest.mark.unit
def test_summary_explain_and_overrides():
    result = run("summary", "--model", "seed", "--set", "first_layer_convs=16", "--explain")
    assert result.exit_code == 0
    assert "(3·3·1+1)·16 = 160" in result.output and "(26, 26, 16)" in result.output


@pytest.mark.unit
def test_presets_lists_and_prints_yaml():
    assert "seed-dropout" in run("presets").output
    assert "first_layer_conv_width" in run("presets", "seed").output


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["summary", "--set", "dropotu=0.4"], "unknown config key 'dropotu'; did you mean 'dropout'"),
    (["summary", "--model", "sed"], "unknown model preset 'sed'"),
    (["train", "--dataset", "mnst"], "unknown dataset 'mnst'; did you mean 'mnist'"),
    (["train", "--dataset", "fashion-mnist"], "apt-get install dataset-fashion-mnist"),
    (["evaluate", "nowhere"], "nowhere: no such run directory"),
    (["evaluate", str(Path(__file__).resolve().parents[1] / "README.md")],
     "README.md: not a run directory but a file; give the folder `cnnlab train` made"),
    (["datasets", "verify", "fashion-mnist"], "not found"),
])
def test_errors_are_one_clear_line_with_status_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_datasets_list_where_verify():
    listing = run("datasets", "list")
    assert "fashion-mnist-sample" in listing.output and "package" in listing.output
    assert "using" in run("datasets", "where", "mnist-sample").output
    verify = run("datasets", "verify", "mnist-sample")
    assert verify.exit_code == 0 and "all 4 files verified" in verify.output


def test_train_then_evaluate(tmp_path):
    result = run("train", "--dataset", "fashion-mnist-sample", "--model", "seed", "--epochs", "1", "--threads", "1",
                 "--set", "dropout=0.4", "--set", "first_layer_convs=8", "--runs-dir", str(tmp_path), "--name", "f")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and f"results in {tmp_path / 'f'}" in result.output
    table = run("evaluate", str(tmp_path / "f"))
    assert "Ankle boot" in table.output and "most confused" in table.output
    data = json.loads(run("evaluate", "--runs-dir", str(tmp_path), "--json").output)
    assert {"accuracy", "loss", "per_class", "confusion_matrix"} <= set(data)
    assert data["per_class"][0]["class_name"] == "T-shirt/top"
    assert sum(map(sum, data["confusion_matrix"])) == 1000


def test_python_m_cnnlab_runs():
    out = subprocess.run([sys.executable, "-m", "cnnlab", "presets"], capture_output=True, text=True, check=True)
    assert "seed" in out.stdout


@pytest.mark.unit
def test_resume_refuses_options_that_would_change_the_run(tmp_path):
    result = runner.invoke(app, ["train", "--resume", str(tmp_path), "--epochs", "3"])
    assert result.exit_code == 2 and "drop --epochs" in result.output


@pytest.mark.unit
def test_data_dir_pointing_at_the_files_themselves_gets_a_hint(tmp_path):
    import shutil

    from cnnlab.data.registry import get_dataset
    from cnnlab.data.store import package_dir

    for file in get_dataset("mnist-sample").all_files():
        shutil.copy(package_dir(get_dataset("mnist-sample")) / file.name, tmp_path / file.name)
    result = runner.invoke(app, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert f"The files are directly in {tmp_path}" in result.output


def test_convolve_with_a_kernel_the_model_learned(tmp_path):
    import numpy as np
    from PIL import Image

    trained = tiny_run()  # the shared tiny run: this test only reads its kernels
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "in.png")
    result = run("convolve", str(tmp_path / "in.png"), "--kernel", f"{trained}:conv1:3",
                 "--out", str(tmp_path / "out.png"))
    assert result.exit_code == 0, result.output
    assert "kernel 3 x 3" in result.output and Image.open(tmp_path / "out.png").size == (18, 18)
    bad = runner.invoke(app, ["convolve", str(tmp_path / "in.png"), "--kernel", f"{trained}:conv9:0",
                              "--out", str(tmp_path / "x.png")])
    flat = " ".join(bad.output.replace("│", " ").split())  # rich wraps the message in a box
    assert bad.exit_code == 2 and "no conv layer 'conv9'; did you mean 'conv1'? (this model has: conv1)" in flat


@pytest.mark.unit
def test_help_texts_keep_their_brackets_and_placeholders():
    """Rich markup once swallowed '[wandb]' from "pip install 'cnnlab[wandb]'"."""
    train, export = (help_text(command) for command in ("train", "export"))
    assert "pip install 'cnnlab[wandb]'" in train and "<dataset>/<dataset files>" in train
    assert "onnx (needs cnnlab[export])" in export and "<run>/model.onnx" in export


@pytest.mark.unit
def test_help_groups_the_commands_by_what_a_user_is_doing():
    text = help_text()
    panels = [text.index(title) for title in ("Learn", "Train", "Look inside", "Use a trained run", "Scale out")]
    assert panels == sorted(panels)
    assert text.index("convolve") < text.index("Train") < text.index("evaluate") < text.index("Look inside")


def help_text(*command: str) -> str:
    """A command's help as one line of words: the panels' borders and the wrapping taken out."""
    output = runner.invoke(app, [*command, "--help"]).output
    lines = [line.strip().strip("│╭╰─").strip() for line in output.splitlines()]
    return " ".join(" ".join(lines).split())
