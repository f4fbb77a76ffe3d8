"""CIFAR-10 as a named dataset: the binary batches read from a tiny synthetic archive in the real layout,
malformed archives, downloads from a local server, and a colour run through the commands that show or use it."""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import ChecksumMismatch, CifarError, DatasetUnavailable, load_dataset, locate, store, verify
from cnnlab.data.cifar import RECORD_BYTES, encode
from cnnlab.data.registry import CIFAR10, DATASETS, DataFile, get_dataset
from test_store import Mirror, serve
from use_runs import running_server

runner = CliRunner()
FOLDER = "cifar-10-batches-bin"
ARCHIVE = "cifar-10-binary.tar.gz"
PER_BATCH = 20  # records per synthetic batch file: 5 train batches and one test batch
META = "\n".join(CIFAR10.classes) + "\n\n"  # as the real batches.meta.txt: a name per line, a blank line at the end


def tiny_batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """member -> (images (20, 32, 32, 3), labels): each image's colour leans towards its class, so a model can learn."""
    rng = np.random.default_rng(seed)
    batches = {}
    for member in [*CIFAR10.archive.members["train"], *CIFAR10.archive.members["test"]]:
        labels = rng.integers(0, 10, PER_BATCH)
        tint = np.stack([labels * 25, 255 - labels * 25, (labels % 2) * 200], axis=1)[:, None, None, :]
        noise = rng.integers(0, 56, (PER_BATCH, 32, 32, 3))
        batches[member] = (np.clip(tint * 0.8 + noise, 0, 255).astype(np.uint8), labels.astype(np.uint8))
    return batches


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def archive_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar.gz holding these members, in this order (bytes None: a member with no data, e.g. a link)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def real_layout(batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members in the order of the real archive: folder, batch 1, meta, 2, test, 3, 4, readme, 5."""
    folder = tarfile.TarInfo(FOLDER)
    folder.type = tarfile.DIRTYPE
    blob = {member: encode(*arrays) for member, arrays in batches.items()}
    order = ["data_batch_1.bin", "batches.meta.txt", "data_batch_2.bin", "test_batch.bin", "data_batch_3.bin",
             "data_batch_4.bin", "readme.html", "data_batch_5.bin"]
    members = [(folder, None)]
    for name in order:
        path = f"{FOLDER}/{name}"
        extras = {"batches.meta.txt": META.encode(), "readme.html": b"<html></html>"}
        data = extras[name] if name in extras else blob[path]
        members.append(regular(path, data))
    return members


def tiny_spec(archive: bytes, name: str = "tiny-cifar"):
    """CIFAR-10's spec with this archive's digest and 100 train / 20 test records."""
    file = DataFile(ARCHIVE, None, hashlib.sha256(archive).hexdigest(), archive=True)
    return replace(CIFAR10, name=name, archive=replace(CIFAR10.archive, file=file, counts={"train": 100, "test": 20}),
                   mirrors=(), val_size=10)


@pytest.fixture
def tiny_cifar(tmp_path):
    """(spec, batches, archive bytes, data dir holding tiny-cifar/cifar-10-binary.tar.gz)."""
    batches = tiny_batches()
    archive = archive_bytes(real_layout(batches))
    spec = tiny_spec(archive)
    (tmp_path / "data" / spec.name).mkdir(parents=True)
    (tmp_path / "data" / spec.name / ARCHIVE).write_bytes(archive)
    return spec, batches, archive, tmp_path / "data"


# ---------------------------------------------------------------------------------------- reading
@pytest.mark.unit
def test_records_land_channels_last_with_their_labels(tiny_cifar):
    spec, batches, _, data_dir = tiny_cifar
    dataset = load_dataset(spec, data_dir, download=False)
    assert dataset.train_images.shape == (100, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (20, 32, 32, 3) and dataset.test_labels.dtype == np.int64
    train = [batches[m] for m in CIFAR10.archive.members["train"]]  # batch order, not the archive's member order
    np.testing.assert_array_equal(dataset.train_images, np.concatenate([images for images, _ in train]))
    np.testing.assert_array_equal(dataset.train_labels, np.concatenate([labels for _, labels in train]))
    assert dataset.train_images.flags.c_contiguous
    assert dataset.files == [{"name": ARCHIVE, "path": str(data_dir / spec.name / ARCHIVE),
                              "sha256": spec.archive.file.gz_sha256, "verified": True}]


@pytest.mark.unit
def test_the_red_green_and_blue_planes_are_channels_0_1_2(tmp_path):
    """One hand-made record: label 7, then a red plane of 10s, a green one of 20s, a blue one counting 0..255."""
    blue = np.arange(1024) % 256
    record = bytes([7]) + bytes([10] * 1024) + bytes([20] * 1024) + bytes(blue.astype(np.uint8))
    assert len(record) == RECORD_BYTES
    members = real_layout(tiny_batches())
    members = [(info, record * 20 if info.name.endswith("test_batch.bin") else data) for info, data in members]
    members = [regular(info.name, data) if data is not None else (info, data) for info, data in members]
    archive = archive_bytes(members)
    spec = tiny_spec(archive)
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / ARCHIVE).write_bytes(archive)
    image = load_dataset(spec, tmp_path, download=False).test_images[3]
    assert (image[..., 0] == 10).all() and (image[..., 1] == 20).all()
    np.testing.assert_array_equal(image[..., 2], blue.reshape(32, 32))  # row-major: row 0 is 0..31
    assert image[0, 5, 2] == 5 and image[1, 0, 2] == 32


@pytest.mark.unit
def test_cifar10_is_registered_with_its_archive():
    spec = get_dataset("cifar10")
    assert spec.image_shape == (32, 32, 3) and spec.num_classes == 10 and spec.recipe == "photos"
    assert [f.name for f in spec.all_files()] == [ARCHIVE] and spec.all_files()[0].archive
    assert spec.archive.counts == {"train": 50_000, "test": 10_000}
    assert spec.archive.members["test"] == (f"{FOLDER}/test_batch.bin",)
    assert spec.mirrors == ("https://www.cs.toronto.edu/~kriz/",)


# ---------------------------------------------------------------------------------- bad archives
def broken(tmp_path, members, counts=None) -> str:
    """Load an archive made of these members; return the error message (which must name the archive)."""
    archive = archive_bytes(members) if isinstance(members, list) else members
    spec = tiny_spec(archive)
    if counts:
        spec = replace(spec, archive=replace(spec.archive, counts=counts))
    (tmp_path / spec.name).mkdir(exist_ok=True)
    path = tmp_path / spec.name / ARCHIVE
    path.write_bytes(archive)
    with pytest.raises(CifarError) as info:
        load_dataset(spec, tmp_path, download=False)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def without(members, suffix):
    return [m for m in members if not m[0].name.endswith(suffix)]


@pytest.mark.unit
def test_a_missing_member_is_named(tmp_path):
    message = broken(tmp_path, without(real_layout(tiny_batches()), "data_batch_4.bin"))
    assert f"member(s) missing: {FOLDER}/data_batch_4.bin" in message


@pytest.mark.unit
def test_a_bad_archive_is_one_line_from_the_cli(tmp_path, monkeypatch):
    archive = archive_bytes(without(real_layout(tiny_batches()), "test_batch.bin"))
    spec = tiny_spec(archive)
    monkeypatch.setitem(DATASETS, spec.name, spec)
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / ARCHIVE).write_bytes(archive)
    result = runner.invoke(app, ["train", "--dataset", spec.name, "--data-dir", str(tmp_path),
                                 "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"member(s) missing: {FOLDER}/test_batch.bin" in flat and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.unit
def test_a_member_of_the_wrong_size_is_named_with_its_size(tmp_path):
    members = real_layout(tiny_batches())
    members = [regular(i.name, d[:-5]) if i.name.endswith("data_batch_2.bin") else (i, d) for i, d in members]
    message = broken(tmp_path, members)
    assert f"member {FOLDER}/data_batch_2.bin: expected a whole number of 3073-byte records, " \
           f"found 61,455 bytes (19 records and 3068 bytes over)" in message


@pytest.mark.unit
def test_a_wrong_record_count_names_the_split_and_both_counts(tmp_path):
    message = broken(tmp_path, real_layout(tiny_batches()), counts={"train": 50_000, "test": 20})
    assert "the train members" in message and "hold 100 records; expected 50,000" in message


@pytest.mark.unit
def test_label_10_is_refused_with_its_record(tmp_path):
    batches = tiny_batches()
    images, labels = batches[f"{FOLDER}/test_batch.bin"]
    labels = labels.copy()
    labels[4] = 10
    batches[f"{FOLDER}/test_batch.bin"] = (images, labels)
    message = broken(tmp_path, real_layout(batches))
    assert f"member {FOLDER}/test_batch.bin: record 4 has label 10; expected 0..9" in message


@pytest.mark.unit
@pytest.mark.parametrize("name", ["../evil", "/etc/evil", f"{FOLDER}/data_batch_6.bin", f"{FOLDER}/../x"])
def test_an_unexpected_member_is_refused(tmp_path, name):
    members = real_layout(tiny_batches())
    message = broken(tmp_path, members[:3] + [regular(name, b"boo")] + members[3:])
    assert f"unexpected member {name!r} (regular file)" in message


@pytest.mark.unit
def test_a_symlink_in_place_of_a_batch_is_refused(tmp_path):
    link = tarfile.TarInfo(f"{FOLDER}/data_batch_3.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/dev/zero"
    members = [m if not m[0].name.endswith("data_batch_3.bin") else (link, None) for m in real_layout(tiny_batches())]
    message = broken(tmp_path, members)
    assert f"member {FOLDER}/data_batch_3.bin: expected a regular file, found a symbolic link to '/dev/zero'" in message


@pytest.mark.unit
def test_a_symlink_elsewhere_is_refused(tmp_path):
    link = tarfile.TarInfo("evil-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    message = broken(tmp_path, real_layout(tiny_batches()) + [(link, None)])
    assert "unexpected member 'evil-link' (symbolic link to '/etc/passwd')" in message


@pytest.mark.unit
@pytest.mark.parametrize("body, why", [(b"<html>not here</html>", "not a gzip file"),
                                       (b"\x1f\x8b" + b"\x00" * 50, "not a readable tar.gz archive"),
                                       ("truncated", "not a readable tar.gz archive")])  # truncated: half the file
def test_not_a_tar_gz_is_refused(tmp_path, body, why):
    if body == "truncated":
        whole = archive_bytes(real_layout(tiny_batches()))
        body = whole[: len(whole) // 2]
    message = broken(tmp_path, body)
    assert "not a readable tar.gz archive" in message and why in message


@pytest.mark.unit
def test_wrong_class_names_in_the_meta_member(tmp_path):
    members = real_layout(tiny_batches())
    members = [regular(i.name, b"cat\ndog\n") if i.name.endswith("meta.txt") else (i, d) for i, d in members]
    message = broken(tmp_path, members)
    assert f"member {FOLDER}/batches.meta.txt: expected the class names airplane, automobile" in message
    assert "found cat, dog" in message


@pytest.mark.unit
def test_a_changed_archive_needs_the_explicit_flag(tiny_cifar):
    spec, _, _, data_dir = tiny_cifar
    spec = replace(spec, archive=replace(spec.archive, file=replace(spec.archive.file, gz_sha256="0" * 64)))
    with pytest.raises(ChecksumMismatch, match=f"{ARCHIVE}: checksum mismatch: the file's SHA-256 is"):
        load_dataset(spec, data_dir, download=False)
    dataset = load_dataset(spec, data_dir, download=False, allow_mismatch=True)
    assert dataset.files[0]["verified"] is False


# -------------------------------------------------------------------------------------- downloads
@pytest.mark.unit
def test_lookup_finds_the_one_archive(tiny_cifar, monkeypatch):
    spec, _, _, data_dir = tiny_cifar
    assert locate(spec, data_dir).origin == "data-dir"
    assert locate(spec) is None
    monkeypatch.setenv("CNNLAB_DATA", str(data_dir))
    assert locate(spec).origin == "CNNLAB_DATA"


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["flip", "html", "html-as-gzip", "truncate", "404"])
def test_a_bad_mirror_moves_on_to_the_next(tiny_cifar, mode):
    spec, _, archive, _ = tiny_cifar
    with serve({ARCHIVE: archive}, {"bad": mode}) as url:
        location = store.fetch(replace(spec, mirrors=(f"{url}/bad/", f"{url}/good/")), progress=False)
    assert location.origin == "download" and (location.directory / ARCHIVE).read_bytes() == archive
    assert [hit.split("/")[1] for hit in Mirror.hits] == ["bad", "good"]
    assert [check.ok for check in verify(location)] == [True]
    assert sorted(p.name for p in location.directory.iterdir()) == [ARCHIVE]  # no .part left


@pytest.mark.unit
def test_a_flipped_byte_is_a_checksum_error(tiny_cifar):
    spec, _, archive, _ = tiny_cifar
    with serve({ARCHIVE: archive}, {"a": "flip", "b": "html-as-gzip"}) as url, \
            pytest.raises(DatasetUnavailable) as info:
        store.fetch(replace(spec, mirrors=(f"{url}/a/", f"{url}/b/")), progress=False)
    message = str(info.value)
    assert f"{url}/a/{ARCHIVE}: checksum mismatch: got" in message
    assert f"expected {spec.archive.file.gz_sha256} (of the download)" in message
    assert f"{url}/b/{ARCHIVE}: served an HTML page instead of the file" in message
    folder = store.cache_root() / spec.name
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.unit
def test_datasets_fetch_where_and_verify_commands(tiny_cifar, monkeypatch):
    spec, _, archive, _ = tiny_cifar
    with serve({ARCHIVE: archive}, {}) as url:
        monkeypatch.setitem(DATASETS, spec.name, replace(spec, mirrors=(f"{url}/m/",)))
        fetched = runner.invoke(app, ["datasets", "fetch", spec.name])
    assert fetched.exit_code == 0, fetched.output
    assert str(store.cache_root() / spec.name) in fetched.output
    assert "using" in runner.invoke(app, ["datasets", "where", spec.name]).output
    listing = runner.invoke(app, ["datasets", "list"]).output
    assert "cifar10" in listing and "(32, 32, 3)" in listing
    checked = runner.invoke(app, ["datasets", "verify", spec.name])
    assert checked.exit_code == 0 and f"{ARCHIVE}" in checked.output and "all 1 files verified" in checked.output
    (store.cache_root() / spec.name / ARCHIVE).write_bytes(archive[:-1] + bytes([archive[-1] ^ 1]))
    bad = runner.invoke(app, ["datasets", "verify", spec.name])
    assert bad.exit_code == 1 and "MISMATCH" in bad.output


# ------------------------------------------------------------------------- a colour run end to end
def pixels_of(png):
    """The PIL image in a PNG file, loaded."""
    from PIL import Image

    image = Image.open(png)
    image.load()
    return image


@pytest.fixture
def colour_run(tiny_cifar, tmp_path, monkeypatch):
    """One epoch of a small deep-color model on the tiny colour dataset, registered under its name."""
    from cnnlab import pipeline
    from cnnlab.config import load_config

    spec, _, _, data_dir = tiny_cifar
    monkeypatch.setitem(DATASETS, spec.name, spec)
    config = load_config("deep-color", overrides=[
        "filters=4", "filters_wide=4", "filters_widest=8", "dense_layer_size=16", "train.epochs=1",
        "train.batch_size=30"], data={"dataset": spec.name, "data_dir": str(data_dir)})
    result = pipeline.train(config, tmp_path / "runs", name="colour", progress=False)
    return result.run, spec


def cli(*args) -> str:
    """What `cnnlab ARGS` prints on stdout (stderr holds notes, such as which backend ran the model)."""
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_colour_run_through_show_report_predict_and_export(colour_run, tmp_path):
    from PIL import Image

    run, spec = colour_run
    assert "(32, 32, 3)" in (run / "summary.txt").read_text()

    assert "conv1: 4 filters x 3 input channel(s) in a 4x3 grid" in cli("show", "kernels", run, "--out",
                                                                        tmp_path / "kernels.png")

    cli("show", "features", run, "--index", "0", "--out", tmp_path / "features.png")
    cli("show", "mistakes", run, "--out", tmp_path / "mistakes.png")
    cli("show", "saliency", run, "--index", "3", "--out", tmp_path / "saliency.png")
    for name in ("features", "mistakes", "saliency"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")

    photo = np.zeros((90, 160, 3), np.uint8)
    photo[:, :, 0] = np.linspace(0, 255, 160, dtype=np.uint8)  # a red ramp, wider than high
    photo[30:60, 60:100] = (20, 200, 40)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    cli("show", "features", run, tmp_path / "photo.png", "--out", tmp_path / "photo-features.png")
    cli("show", "saliency", run, tmp_path / "photo.png", "--out", tmp_path / "photo-saliency.png")

    output = cli("predict", run, tmp_path / "photo.png", "--json", "--preview", tmp_path / "preview.png")
    import json

    answer = json.loads(output.splitlines()[0])
    assert answer["class_name"] in spec.classes and len(answer["probabilities"]) == 10
    preview = pixels_of(tmp_path / "preview.png")
    assert preview.mode == "RGB" and preview.size == (2 + 32 * 4 + 2, 2 + 32 * 4 + 2)

    convolved = cli("convolve", tmp_path / "photo.png", "--kernel", f"{run}:conv1:0", "--out", tmp_path / "conv.png")
    assert "kernel 3 x 3 x 3   (the kernel's own slice for each of the 3 channels" in convolved
    assert "output 88 x 158 " in convolved

    cli("report", run)
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and "airplane" in page


@pytest.mark.unit
def test_colour_images_are_drawn_in_colour(tmp_path):
    """A pure red test image shows as pure red pixels in the mistakes grid; a grey one stays grey."""
    from cnnlab.inspect.figures import Mistake, plot_mistakes

    red = np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    plot_mistakes(red, [Mistake(0, 1, 2, 0.9)], CIFAR10.classes, tmp_path / "red.png")
    pixels = np.asarray(pixels_of(tmp_path / "red.png").convert("RGB")).reshape(-1, 3)
    assert ((pixels == (255, 0, 0)).all(axis=1)).sum() > 500
    plot_mistakes(np.full((1, 28, 28), 200, np.uint8), [Mistake(0, 1, 2, 0.9)], CIFAR10.classes, tmp_path / "g.png")
    pixels = np.asarray(pixels_of(tmp_path / "g.png").convert("RGB")).reshape(-1, 3)
    assert ((pixels == (200, 200, 200)).all(axis=1)).sum() > 500


@pytest.mark.unit
def test_the_photos_recipe_keeps_colour_and_crops_the_centre_square():
    from PIL import Image

    from cnnlab.use.recipes import prepare

    photo = np.zeros((100, 300, 3), np.uint8)
    photo[:, :100] = (255, 0, 0)  # red left third, green middle, blue right third
    photo[:, 100:200] = (0, 255, 0)
    photo[:, 200:] = (0, 0, 255)
    prepared = prepare(Image.fromarray(photo), "photos", 32)
    assert prepared.shape == (32, 32, 3) and prepared.dtype == np.uint8
    assert (prepared[:, 2:-2, 1] > 240).all() and (prepared[:, 2:-2, [0, 2]] < 15).all()  # the green centre only


def test_predictor_and_web_demo_on_a_colour_model(colour_run, tmp_path):
    httpx = pytest.importorskip("httpx", reason="the web demo's tests need: pip install -e '.[test]'")
    from PIL import Image

    from cnnlab.use.export import example_inputs, export_run
    from cnnlab.use.predict import Predictor, predict_arrays
    from cnnlab.use.serve import create_app

    run, spec = colour_run
    predictor = Predictor.from_run(run)
    assert predictor.recipe == "photos"
    prediction = predict_arrays(predictor, np.full((1, 40, 40, 3), 128, np.uint8))[0]
    assert prediction.image.shape == (32, 32, 3) and abs(prediction.probabilities.sum() - 1) < 1e-5
    inputs = example_inputs(predictor, np.zeros((2, 32, 32, 3), np.uint8))
    assert inputs.shape == (2, 3, 32, 32)
    assert example_inputs(predictor).shape == (64, 3, 32, 32)  # random ink when no images are given
    result = export_run(run, "torchscript", tmp_path / "model.pt")
    assert result.images_checked == 64 and result.max_abs_difference <= 1e-4

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(buffer, "PNG")
    with running_server(create_app([predictor])) as url, httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/api/predict", params={"details": "true"},
                             files={"file": ("photo.png", buffer.getvalue(), "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["class_name"] in spec.classes
    import base64

    seen = Image.open(io.BytesIO(base64.b64decode(body["input_image"].split(",", 1)[1])))
    assert seen.mode == "RGB" and seen.size == (32, 32)
    assert [panel["layer"] for panel in body["feature_maps"]] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
