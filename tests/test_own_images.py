"""A folder of one's own photos, first-class: held in memory, summarised, pinned by its runs, the photos default,
and pictures fitted by crop, pad or squish."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import load_config
from cnnlab.images import fitted
from cnnlab.training.augment import random_colour, random_zoom
from conftest import tiny_train_args, weights
from test_folder_training import with_bad_files, write_colour_folder

# the tiny training's options for a 12x12 folder read in the main process: one epoch of batches of 16
QUICK = tiny_train_args("--epochs", "1", "--set", "data.image_size=12", "--set", "data.workers=0", "--set",
                        "batch_size=16", shrink_model=False)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# ------------------------------------------------------------------------------------------- held in memory
def test_a_folder_held_in_memory_trains_bitwise_as_one_streamed_from_disk(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=30)
    bad = with_bad_files(folder)
    runs = []
    for name, memory in (("memory", "2048"), ("streamed", "0")):
        config = load_config("seed", None, ["data.image_size=12", "data.workers=0", "train.epochs=2",
                                            "train.batch_size=16", "train.threads=1", f"data.memory_mb={memory}",
                                            "train.augment_shift=1"], data={"dataset": str(folder)})
        result = pipeline.train(config, tmp_path / "runs", name=name, progress=False)
        runs.append(result.run)
        assert sorted(result.skipped) == bad  # unreadable files are reported whichever way they were read
    memory_run, streamed_run = runs
    a, b = weights(memory_run), weights(streamed_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifests = [json.loads((run / "manifest.json").read_text())["image_folder"] for run in runs]
    assert manifests[0]["digest"] == manifests[1]["digest"]


@pytest.mark.unit
def test_a_folder_over_the_memory_budget_streams(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=10)
    config = load_config("seed", None, ["data.image_size=12", "data.workers=0", "data.memory_mb=0"],
                         data={"dataset": str(folder)})
    from cnnlab.data.sources import folder_data

    data = folder_data(config)
    assert all(source.pixels is None for source in (data.train, data.val, data.test))
    config = load_config("seed", None, ["data.image_size=12", "data.workers=0"], data={"dataset": str(folder)})
    held = folder_data(config)
    assert held.train.pixels is not None and held.train.pixels.shape[1:] == (3, 12, 12)


# ------------------------------------------------------------------------------------------- the summary
def test_datasets_info_counts_classes_by_split_and_names_what_was_skipped(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=30)
    with_bad_files(folder)
    shown = invoke("datasets", "info", str(folder), "--image-size", "16", "--resize", "crop")
    assert shown.exit_code == 0, shown.output
    assert "found 93 files belonging to 3 classes" in shown.output  # 90 images and 3 unreadable ones
    assert "each becomes 16x16x3 by crop" in shown.output
    # unnamed, the size and fit are the ones `cnnlab train --dataset FOLDER` would use: photos, 48x48 padded
    assert "each becomes 48x48x3 by pad" in invoke("datasets", "info", str(folder)).output
    assert "skipped 3 unreadable files" in shown.output and "empty file" in shown.output
    assert "fewer than 20 test images" in shown.output  # a warning: 30 per class leave ~3 test images each
    as_json = json.loads(invoke("datasets", "info", str(folder), "--json").output)
    assert as_json["classes"] == ["blue", "green", "red"] and as_json["files"] == 93
    counted = {name: sum(as_json["counts"][split][name] for split in ("train", "val", "test"))
               for name in as_json["classes"]}
    assert counted == {"blue": 31, "green": 31, "red": 31}
    readable = sum(n for split in as_json["readable"].values() for n in split.values())
    assert readable == 90 and sum(as_json["skipped"].values()) == 3


def test_training_warns_about_imbalance_and_too_few_steps(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=40)
    for extra in sorted((folder / "red").iterdir())[6:]:  # red keeps 6 images: 40 / 6 is over 5x
        extra.unlink()
    trained = invoke("train", "--dataset", str(folder), *QUICK, "--set", "batch_size=64", "--runs-dir",
                     str(tmp_path / "runs"))
    assert trained.exit_code == 0, trained.output
    assert "classes are imbalanced" in trained.output and "train.class_weights=balanced" in trained.output
    assert "make 2 steps an epoch" in trained.output


@pytest.mark.unit
def test_a_class_with_no_readable_image_stops_training_before_a_run_is_made(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=10)
    for picture in (folder / "green").iterdir():
        picture.write_bytes(b"not a picture")
    trained = invoke("train", "--dataset", str(folder), *QUICK, "--runs-dir", str(tmp_path / "runs"))
    assert trained.exit_code != 0
    lines = [line for line in trained.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "green" in lines[0] and "no readable training image" in lines[0]
    assert "Traceback" not in trained.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------------------------------- pinning
@pytest.fixture
def folder_run(tmp_path, monkeypatch):
    """A run trained from a relative folder path, and the folder."""
    work = tmp_path / "work"
    write_colour_folder(work / "colours", per_class=40)
    monkeypatch.chdir(work)
    trained = invoke("train", "--dataset", "colours", *QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "c")
    assert trained.exit_code == 0, trained.output
    return tmp_path / "runs" / "c", work / "colours"


def test_a_run_pins_its_folder_and_evaluates_from_anywhere(folder_run, tmp_path, monkeypatch):
    run, folder = folder_run
    config = (run / "config.yaml").read_text()
    assert f"dataset: {folder}" in config  # absolute, not as typed
    manifest = json.loads((run / "manifest.json").read_text())["image_folder"]
    assert manifest["classes"] == ["blue", "green", "red"]
    assert set(manifest["class_digests"]) == set(manifest["classes"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    evaluated = invoke("evaluate", str(run), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert "changed since" not in evaluated.output


@pytest.mark.parametrize("change", ["rename", "add", "remove"])
def test_evaluate_refuses_a_folder_whose_classes_changed_and_keeps_test_json(folder_run, change):
    run, folder = folder_run
    before = (run / "test.json").read_bytes()
    if change == "rename":
        (folder / "green").rename(folder / "lime")
    elif change == "add":
        shutil.copytree(folder / "red", folder / "yellow")
    else:
        shutil.rmtree(folder / "blue")
    # every command that opens the run's folder again, whichever way it reads it
    commands = [["evaluate", str(run)], ["show", "mistakes", str(run), "--out", str(run.parent / "m.png")],
                ["show", "label-issues", str(run), "--json"],
                ["show", "batch", str(run), "--out", str(run.parent / "b.png")]]
    if importlib.util.find_spec("onnxruntime") is not None:  # the export extra: calibration reads the folder
        commands.append(["export", str(run), "--format", "onnx", "--quantize", "int8"])
    for command in commands:
        refused = invoke(*command)
        assert refused.exit_code != 0
        error = [line for line in refused.output.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "class folders are not the ones" in error[0], refused.output
        word = {"rename": "renamed green -> lime", "add": "added yellow", "remove": "removed blue"}[change]
        assert word in error[0]
    assert (run / "test.json").read_bytes() == before
    assert not (run.parent / "m.png").exists() and not (run.parent / "b.png").exists()
    assert not (run / "model.int8.onnx").exists()


def test_evaluate_warns_with_counts_when_files_changed(folder_run):
    run, folder = folder_run
    shutil.copy(folder / "red" / "0.png", folder / "red" / "copy.png")
    (folder / "blue" / "1.jpg").unlink()
    evaluated = invoke("evaluate", str(run))
    assert evaluated.exit_code == 0, evaluated.output
    assert "changed since" in evaluated.output and "120 -> 120 files" in evaluated.output
    assert "blue -1" in evaluated.output and "red +1" in evaluated.output


def test_evaluate_reads_only_the_test_split_s_files(folder_run, monkeypatch):
    """Evaluating a run reads its test pictures once: decoding the training split too (all of it held in memory,
    as training does) would cost a large folder minutes for nothing."""
    import cnnlab.data.folder_source as folder_source

    run, folder = folder_run
    opened: list[str] = []
    decode = folder_source.decode_image

    def counting(path, *args, **kwargs):
        opened.append(str(Path(path).relative_to(folder)))
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(folder_source, "decode_image", counting)
    assert invoke("evaluate", str(run)).exit_code == 0
    tested = [row.split(",")[0] for row in (run / "predictions.csv").read_text().splitlines()[1:]]
    assert sorted(opened) == sorted(tested) and 0 < len(opened) < 120


# ------------------------------------------------------------------------------------------- the default
def test_a_colour_folder_gets_the_photos_model_when_none_is_named(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=10)
    quick = [arg for arg in QUICK if arg not in ("--model", "seed")]
    trained = invoke("train", "--dataset", str(folder), *quick, "--runs-dir", str(tmp_path / "runs"), "--name", "p")
    assert trained.exit_code == 0, trained.output
    assert "no model named: training 'photos'" in trained.output
    assert "name: photos" in (tmp_path / "runs" / "p" / "config.yaml").read_text()
    grey = invoke("summary", "--dataset", str(folder), "--set", "data.channels=1")
    assert "photos" not in grey.output and "conv1" in grey.output  # a grey folder: the lesson's seed
    named = invoke("summary", "--dataset", "mnist-sample")
    assert "no model named" not in named.output


# ------------------------------------------------------------------------------------------- fitting pictures
def wide_picture() -> Image.Image:
    """40x20: a red left half and a blue right half on a green border."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    pixels[0, :], pixels[-1, :], pixels[:, 0], pixels[:, -1] = (0, 200, 0), (0, 200, 0), (0, 200, 0), (0, 200, 0)
    return Image.fromarray(pixels)


@pytest.mark.unit
def test_crop_pad_and_squish_fit_a_wide_picture_as_named():
    crop = np.asarray(fitted(wide_picture(), (10, 10), "crop"))
    pad = np.asarray(fitted(wide_picture(), (10, 10), "pad"))
    squish = np.asarray(fitted(wide_picture(), (10, 10), "squish"))
    assert crop.shape == pad.shape == squish.shape == (10, 10, 3)
    assert not (crop[:, 0, 1] > 150).all()  # the crop cut the green left border off
    assert (pad[0, :, 1] > 150).all() and (pad[-1, :, 1] > 150).all()  # bars of the border's colour
    assert squish[5, 2, 0] > 150 and squish[5, 7, 2] > 150  # both halves kept, squeezed


@pytest.mark.unit
def test_zoom_keeps_the_batch_and_zero_is_no_change():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(random_zoom(images, 0.0), images)
    zoomed = random_zoom(images, 0.5)
    assert zoomed.shape == images.shape and zoomed.dtype == torch.uint8 and not torch.equal(zoomed, images)


@pytest.mark.unit
def test_a_zoomed_photo_has_no_black_bars():
    backdrop = torch.full((16, 3, 20, 20), 200, dtype=torch.uint8)  # a light backdrop, as photos have
    backdrop[:, :, 8:12, 8:12] = 30  # the object
    zoomed = random_zoom(backdrop, 0.5)
    assert int(zoomed.min()) >= 30  # nothing darker than the object: no black bars where the picture ends


@pytest.mark.unit
def test_colour_jitter_keeps_shapes_and_changes_colours():
    torch.manual_seed(0)
    images = torch.zeros((64, 3, 8, 8), dtype=torch.uint8)
    images[:, 0, 2:6, 2:6] = 250  # a red square on black
    jittered = random_colour(images, 1.0)
    assert jittered.shape == images.shape and jittered.dtype == torch.uint8
    square = jittered[:, :, 2:6, 2:6].float().mean((2, 3))  # (64, 3) the square's colour in each image
    outside = jittered[:, :, 0, 0].float()
    assert ((square.max(1).values - outside.max(1).values) > 10).all()  # the square still stands out
    assert len({int(c) for c in square.argmax(1)}) == 3  # ... but not always in red
    assert torch.equal(random_colour(images, 0.0), images)
    grey = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert random_colour(grey, 1.0).shape == grey.shape  # grey batches get brightness and contrast only


# ------------------------------------------------------------------------------------------- a hostile probe's cases
def test_resume_refuses_a_folder_whose_files_changed(folder_run):
    run, folder = folder_run
    shutil.copy(folder / "red" / "0.png", folder / "red" / "copy.png")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    resumed = invoke("train", "--resume", str(run))
    assert resumed.exit_code != 0 and "Traceback" not in resumed.output
    assert "--resume would go on with other splits" in resumed.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_picture_that_cannot_be_written_leaves_test_json_and_the_evaluation_is_printed(folder_run):
    run, _ = folder_run
    before = (run / "test.json").read_bytes()
    (run / "confusion.png").unlink()
    (run / "confusion.png").mkdir()  # a folder where the picture goes
    evaluated = invoke("evaluate", str(run), "--json")
    assert evaluated.exit_code == 2
    assert '"accuracy"' in evaluated.output and "test.json is as it was" in evaluated.output
    assert (run / "test.json").read_bytes() == before


def test_the_web_demo_names_a_folder_run_s_dataset_without_its_path(folder_run):
    from cnnlab.use.predict import Predictor

    run, folder = folder_run
    described = Predictor.from_run(run).describe()
    assert described["dataset"] == "colours" and str(folder.parent) not in json.dumps(described)


def test_class_names_with_dollars_and_quotes_draw(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=40)
    (folder / "green").rename(folder / "gr\"e'en $x")
    trained = invoke("train", "--dataset", str(folder), *QUICK, "--runs-dir", str(tmp_path / "runs"), "--name", "d")
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "d"
    for command in (["report", str(run)], ["show", "features", str(run), "--index", "0", "--out",
                                            str(tmp_path / "f.png")]):
        shown = invoke(*command)
        assert shown.exit_code == 0 and "Traceback" not in shown.output, (command, shown.output)


@pytest.mark.unit
@pytest.mark.parametrize("storage", ["//u:SECRET@host/db", " postgres://u:SECRET@h/db", "postgres://u:p@SECRET@h/db"])
def test_storage_that_looks_like_a_url_is_refused_without_its_password_or_a_folder(storage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["sweep", "status", "s", "--storage", storage], ["sweep", "best", "s", "--storage", storage]):
        refused = invoke(*command)
        assert refused.exit_code != 0 and "SECRET" not in refused.output and "Traceback" not in refused.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_sweep_status_refuses_a_name_that_leaves_the_sweeps_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused = invoke("sweep", "status", "../../etc")
    assert refused.exit_code != 0 and refused.output.startswith("error:") and "Traceback" not in refused.output


@pytest.mark.unit
@pytest.mark.parametrize("batch, advice", [(64, "a lower --set train.batch_size (e.g. 8)"),
                                           (8, "more images help most")])  # 8 already: not advised again
def test_the_too_few_steps_advice_never_suggests_the_batch_size_in_use(batch, advice):
    from cnnlab.config.schema import TrainConfig
    from cnnlab.data.summary import FolderSummary, schedule_warnings

    counts = {"train": {"a": 24, "b": 21}, "val": {"a": 3, "b": 3}, "test": {"a": 3, "b": 3}}
    summary = FolderSummary("f", ("a", "b"), counts, counts, {}, {}, 0, (48, 48, 3), "pad", True, 0)
    [warning] = schedule_warnings(summary, TrainConfig(batch_size=batch, schedule="constant"))
    assert advice in warning and f"batches of {batch}" in warning


@pytest.mark.unit
@pytest.mark.parametrize("layout, advice", [("classes", "or put a test/ folder beside train/"),
                                            ("splits", "add images to test/")])  # train/ and test/ already
def test_the_small_test_split_advice_fits_the_folder_s_layout(layout, advice):
    from cnnlab.data.summary import FolderSummary, data_warnings

    counts = {"train": {"a": 40, "b": 40}, "val": {"a": 5, "b": 5}, "test": {"a": 5, "b": 5}}
    summary = FolderSummary("f", ("a", "b"), counts, counts, {}, {}, 0, (48, 48, 3), "pad", True, 0,
                            layout=layout)
    [warning] = [w for w in data_warnings(summary) if "test images" in w]
    assert warning.endswith(advice)


def test_a_moved_folder_is_named_as_the_run_s_and_data_dir_points_the_run_at_its_new_place(folder_run):
    run, folder = folder_run
    moved = folder.parent / "colours-moved"
    folder.rename(moved)
    lost = invoke("evaluate", str(run))
    assert lost.exit_code == 2
    assert f"the folder {run} was trained on is not there (moved or deleted?)" in lost.output
    assert "--data-dir FOLDER" in lost.output
    found = invoke("evaluate", str(run), "--data-dir", str(moved), "--json")
    assert found.exit_code == 0, found.output
    assert "changed since" not in found.output  # the same files: the pin holds
    batch = invoke("show", "batch", str(run), "--data-dir", str(moved), "--out", str(run.parent / "b.png"))
    assert batch.exit_code == 0, batch.output
    (moved / "green").rename(moved / "lime")  # another folder given as the new place: still refused
    refused = invoke("show", "mistakes", str(run), "--data-dir", str(moved), "--out", str(run.parent / "m.png"))
    assert refused.exit_code == 2 and "renamed green -> lime" in refused.output


@pytest.mark.unit
def test_a_runs_dir_that_is_a_file_or_a_taken_name_is_refused_before_the_folder_is_read(tmp_path, monkeypatch):
    from cnnlab.data import sources

    def never(*args, **kwargs):
        raise AssertionError("the folder was read before the run's place was checked")

    monkeypatch.setattr(sources, "folder_data", never)
    folder = write_colour_folder(tmp_path / "colours", per_class=4)
    (tmp_path / "afile").write_text("x")
    as_file = invoke("train", "--dataset", str(folder), "--runs-dir", str(tmp_path / "afile"))
    assert as_file.exit_code == 2 and f"--runs-dir {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a " \
        "folder" in as_file.output, as_file.output
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    taken = invoke("train", "--dataset", str(folder), "--runs-dir", str(tmp_path / "runs"), "--name", "taken")
    assert taken.exit_code == 2 and "a run of that name exists" in taken.output, taken.output


@pytest.mark.unit
def test_a_report_without_enough_test_images_for_a_map_says_so_and_keeps_the_rest(monkeypatch):
    from cnnlab.inspect import report
    from cnnlab.inspect.embedding import EmbeddingError

    def too_few(*args, **kwargs):
        raise EmbeddingError("a map needs at least 3 images, got 2")  # a folder's test split of 2 images

    monkeypatch.setattr(report, "show_embedding", too_few)
    section = report.map_section(loaded=None)
    assert "No map: a map needs at least 3 images, got 2" in section


def test_the_manifest_records_the_threads_the_run_was_given(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=12)
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2  # not what the process has already
    try:
        trained = invoke("train", "--dataset", str(folder), *QUICK, "--threads", str(wanted), "--runs-dir",
                         str(tmp_path / "runs"), "--name", "t")
    finally:
        torch.set_num_threads(before)
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())["threads"] == wanted


def test_a_huge_header_in_a_folder_is_counted_not_warned_about_by_pillow(tmp_path):
    from use_runs import png_header_claiming

    folder = write_colour_folder(tmp_path / "colours", per_class=10)
    (folder / "red" / "huge.png").write_bytes(png_header_claiming(12000, 12000))  # 144 Mpx: Pillow warns
    import warnings

    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        shown = invoke("datasets", "info", str(folder))
    assert shown.exit_code == 0, shown.output
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]  # on the user's stderr
    assert "too large" in shown.output


@pytest.mark.unit
def test_the_preview_of_a_big_folder_draws_a_bounded_number_of_pictures(tmp_path):
    from cnnlab.use.predict import PREVIEW_IMAGES, save_preview

    images = [np.full((28, 28), i % 256, np.uint8) for i in range(PREVIEW_IMAGES + 300)]
    with Image.open(save_preview(images, tmp_path / "p.png")) as drawn:
        rows = -(-PREVIEW_IMAGES // 10)  # ten a row
        assert drawn.height == rows * (28 * 4 + 2) + 2


@pytest.mark.unit
def test_a_misspelt_key_on_a_folder_run_is_checked_against_the_model_that_trains(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class=4)
    refused = invoke("train", "--dataset", str(folder), "--set", "bogus=1", "--runs-dir", str(tmp_path / "runs"))
    assert refused.exit_code == 2
    assert "this model's knobs: filters, widen" in refused.output  # photos', not the lesson's seed's
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_load_dataset_given_a_folder_says_it_is_one_and_what_takes_it(tmp_path, monkeypatch):
    import cnnlab

    write_colour_folder(tmp_path / "colours", per_class=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cnnlab.UserError) as error:
        cnnlab.load_dataset("colours/")
    assert "that is an image folder" in str(error.value) and "does not exist" not in str(error.value)
