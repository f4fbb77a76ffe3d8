"""Every command that takes a dataset name takes an image folder too, as a user runs it: sweeps (a relative
folder read beside the sweep file, scanned once per worker), lr-find, summary (without torch), show batch,
the notebook API and `cnnlab datasets`. (PostgreSQL sweep workers: tests/test_sweep_postgres.py.)"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

import cnnlab
from cnnlab import sweep as sweeps
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.data import folder as folder_module
from cnnlab.data.sources import open_test_set
from cnnlab.inspect.run_table import count_run_params
from cnnlab.models.plan import plan
from cnnlab.use.export import dataset_images
from cnnlab.use.predict import Predictor

runner = CliRunner()
COLOURS = ("red", "green", "blue")
TINY = {"epochs": 1, "first_layer_convs": 4, "dense_layer_size": 8, "data.image_size": 12, "data.workers": 0,
        "train.threads": 1, "batch_size": 16}


def colour_folder(root: Path, classes: int = 2, per_class: int = 20) -> Path:
    """`classes` classes of small noisy images, each dominated by one colour channel."""
    rng = np.random.default_rng(classes)
    for channel, name in enumerate(COLOURS[:classes]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (16, 14, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def write_sweep(path: Path, dataset: str | None, parameters: dict) -> Path:
    spec = dict(method="grid", metric={"name": "val_acc", "goal": "maximize"}, model="seed", set=TINY,
                parameters=parameters, **({"dataset": dataset} if dataset else {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_of(runs: Path, name: str = "sweep") -> list:
    return sweeps.load_study(name, sweeps.default_storage(runs, name)).get_trials()


def test_a_sweep_reads_a_relative_folder_beside_its_file_from_any_folder_and_scans_it_once(tmp_path, monkeypatch):
    folder = colour_folder(tmp_path / "project" / "shapes")
    file = write_sweep(tmp_path / "project" / "sweep.yaml", "shapes/", {"dropout": {"values": [0.0, 0.3]}})
    scans = []
    opened = folder_module.open_image_folder
    monkeypatch.setattr(folder_module, "open_image_folder", lambda *a, **k: scans.append(a) or opened(*a, **k))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the folder is beside the sweep file, not in the current folder

    result = runner.invoke(app, ["sweep", "run", str(file), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    trials = trials_of(tmp_path / "runs")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert len(scans) == 1  # both trials of this worker trained on the one scan
    for trial in trials:
        run = Path(trial.user_attrs["run"])
        assert load_config(None, run / "config.yaml").data.dataset == str(folder)  # absolute: works from anywhere
        assert json.loads((run / "test.json").read_text())["classes"] == ["green", "red"]
    best = runner.invoke(app, ["sweep", "best", "sweep", "--out", str(tmp_path / "best.yaml"),
                               "--runs-dir", str(tmp_path / "runs")])
    assert best.exit_code == 0, best.output
    assert load_config(None, tmp_path / "best.yaml").data.dataset == str(folder)


def test_a_sweep_searches_over_folders_given_as_parameter_values(tmp_path):
    colour_folder(tmp_path / "two", classes=2)
    colour_folder(tmp_path / "data" / "three", classes=3)
    file = write_sweep(tmp_path / "sweep.yaml", None, {"data.dataset": {"values": ["two", "data/three"]}})
    result = runner.invoke(app, ["sweep", "run", str(file), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    classes = {t.params["data.dataset"]: json.loads((Path(t.user_attrs["run"]) / "test.json").read_text())["classes"]
               for t in trials_of(tmp_path / "runs")}
    assert classes == {"two": ["green", "red"], "data/three": ["blue", "green", "red"]}  # the study keeps the text


@pytest.mark.unit
def test_a_sweep_over_a_missing_folder_stops_before_any_trial(tmp_path):
    colour_folder(tmp_path / "shapes")
    file = write_sweep(tmp_path / "sweeps" / "sweep.yaml", "shapes/", {"dropout": {"values": [0.0, 0.3]}})
    result = runner.invoke(app, ["sweep", "run", str(file), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2
    assert f"no such image folder {tmp_path / 'sweeps' / 'shapes'}" in result.output  # where it was looked for
    assert "sweep file's folder" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_summary_of_a_folder_sizes_the_model_without_importing_torch(tmp_path):
    folder = colour_folder(tmp_path / "shapes", classes=3, per_class=2)
    script = ("import sys\nfrom cnnlab.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as exit:\n"
              "    assert not exit.code, exit.code\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, "summary", "--dataset", str(folder), "--set",
                           "data.image_size=12", "--set", "data.channels=1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"
    assert "(12, 12, 1)" in done.stdout and done.stdout.count("(3,)") == 1  # grey 12x12 in, 3 classes out
    empty = subprocess.run([sys.executable, "-m", "cnnlab", "summary", "--dataset", str(folder / "red")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "expected one sub-folder per class" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


@pytest.mark.unit
def test_lr_find_and_show_batch_take_a_folder(tmp_path):
    folder = colour_folder(tmp_path / "shapes")
    small = ["--dataset", str(folder), "--set", "data.image_size=12", "--set", "data.workers=0", "--set",
             "train.threads=1"]
    found = runner.invoke(app, ["lr-find", *small, "--steps", "16", "--end", "0.1", "--json"])
    assert found.exit_code == 0, found.output
    assert len(json.loads(found.output)["lrs"]) == 16
    out = tmp_path / "batch.png"
    shown = runner.invoke(app, ["show", "batch", *small, "--set", "batch_size=8", "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "12x12, 3 channel(s)" in shown.output and "labels:" in shown.output
    assert set(shown.output.split("labels:")[1].replace(",", " ").split()[::2]) <= {"green", "red"}
    assert Image.open(out).mode in ("RGB", "RGBA")


def test_the_notebook_api_trains_evaluates_and_draws_a_folder(tmp_path):
    folder = colour_folder(tmp_path / "shapes", per_class=30)
    run = cnnlab.train(model="seed", dataset=str(folder), epochs=1, progress=False, root=tmp_path / "runs",
                       name="nb", **{"data.image_size": 12, "data.workers": 0, "train.threads": 1})
    evaluation = run.evaluate()
    assert evaluation.classes == ("green", "red") and len(evaluation.labels) == len(run.test.labels)
    picture = Image.open(io.BytesIO(run.show.mistakes()._repr_png_()))
    assert picture.size[0] > 100
    again = cnnlab.open_run(run.run)
    assert again.evaluate().accuracy == evaluation.accuracy
    # `cnnlab export` checks the exported model on the folder's own test images, as training decoded them
    images, _ = open_test_set(load_config(None, run.run / "config.yaml"))  # (N, 3, 12, 12)
    checked = dataset_images(Predictor.from_run(run.run), count=4)
    assert checked is not None and np.array_equal(checked, images[:4].permute(0, 2, 3, 1).numpy())
    # `cnnlab runs` counts a run's parameters from its config when its weights file is gone: the folder's shape
    (run.run / "model.safetensors").unlink()
    config = load_config(None, run.run / "config.yaml")
    assert count_run_params(run.run, config) == plan(config.model, (12, 12, 3), 2).params


@pytest.mark.unit
def test_datasets_where_fetch_and_verify_take_a_folder(tmp_path):
    folder = colour_folder(tmp_path / "shapes")
    where = runner.invoke(app, ["datasets", "where", str(folder)])
    assert where.exit_code == 0 and f"image folder {folder}, 2 classes (green, red)" in where.output
    fetched = runner.invoke(app, ["datasets", "fetch", str(folder)])
    assert fetched.exit_code == 0 and "nothing to download" in fetched.output
    verified = runner.invoke(app, ["datasets", "verify", str(folder)])
    assert verified.exit_code == 0 and "all 40 images read" in verified.output
    (folder / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    broken = runner.invoke(app, ["datasets", "verify", str(folder)])
    assert broken.exit_code == 1
    assert f"UNREADABLE {folder / 'red' / 'broken.png'}" in broken.output and "1 of 41 images" in broken.output
    missing = runner.invoke(app, ["datasets", "verify", str(tmp_path / "nope") + "/"])
    assert missing.exit_code == 2 and "no such folder" in missing.output


@pytest.mark.unit
@pytest.mark.parametrize("command", ["where", "verify"])
def test_a_misspelt_dataset_name_is_still_an_unknown_dataset(command):
    result = runner.invoke(app, ["datasets", command, "mnist-sampel"])
    assert result.exit_code == 2 and "unknown dataset 'mnist-sampel'" in result.output


@pytest.mark.unit
def test_a_relative_folder_opened_from_elsewhere_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["summary", "--dataset", "holiday"])  # no folder of that name here
    assert result.exit_code == 2
    assert "unknown dataset 'holiday'" in result.output and f"{tmp_path / 'holiday'} does not exist" in result.output
