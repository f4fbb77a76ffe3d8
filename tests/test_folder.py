"""Image-folder datasets: layouts, stable splits, decoding every common format, unreadable files, errors."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.folder import FolderError, FolderSource, PathTable, decode_image, open_image_folder
from cnnlab.data.folder_layout import class_names
from cnnlab.data.sources import load_all
from cnnlab.images import ImageTooLarge

pytestmark = pytest.mark.unit  # every test here is in-process and quick

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 0)


def solid(path: Path, colour=RED, size=(20, 16), mode: str = "RGB", **save) -> Path:
    """Write a one-colour image (size is (W, H)), making parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def noise(path: Path, seed: int, size=(24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def touch(path: Path, data: bytes = b"") -> Path:
    """A file of the given bytes (contents do not matter to scanning and splitting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def all_paths(folder) -> dict[str, set[str]]:
    return {name: {str(getattr(folder, name).paths[i]) for i in range(len(getattr(folder, name)))}
            for name in ("train", "val", "test")}


def every(source: FolderSource, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(source.batches(torch.arange(len(source)).split(batch)))


@pytest.fixture
def classes_root(tmp_path) -> Path:
    """root/<class>/ with three classes of 30 small noise PNGs each (one in a nested folder)."""
    root = tmp_path / "pets"
    for c, name in enumerate(["dog", "cat", "bird"]):
        for i in range(30):
            noise(root / name / ("deep/x" if i == 0 else "") / f"{i:03}.png", seed=100 * c + i)
    return root


# ---------------------------------------------------------------------------- layouts
def test_class_layout_sorted_classes_and_a_partition(classes_root):
    folder = open_image_folder(classes_root, image_size=(8, 12), workers=0)
    assert folder.classes == ("bird", "cat", "dog") and folder.image_shape == (8, 12, 3)
    paths = all_paths(folder)
    assert sum(map(len, paths.values())) == 90 and not (paths["train"] & paths["test"]) \
        and not (paths["val"] & paths["test"]) and not (paths["train"] & paths["val"])
    assert "dog/deep/x/000.png" in set().union(*paths.values())  # found recursively
    for split in (folder.train, folder.val, folder.test):
        assert split.labels.dtype == torch.int64 and len(split.labels) == len(split)
        for i in range(len(split)):
            assert folder.classes[split.labels[i]] == str(split.paths[i]).split("/")[0]
    info = folder.describe()
    assert info["counts"] == {"train": len(folder.train), "val": len(folder.val), "test": len(folder.test)}
    assert sum(info["per_class"]["train"].values()) == len(folder.train) and info["layout"] == "classes"
    images, labels = load_all(folder.test)
    assert images.shape == (len(folder.test), 3, 8, 12) and images.dtype == torch.uint8
    assert torch.equal(labels, folder.test.labels)


def test_split_layout_with_and_without_val(tmp_path):
    root = tmp_path / "d"
    for split, n in [("train", 40), ("test", 6)]:
        for name in ("no", "yes"):
            for i in range(n):
                touch(root / split / name / f"{i}.jpg")
    folder = open_image_folder(root, val_fraction=0.25, workers=0)
    paths = all_paths(folder)
    assert folder.classes == ("no", "yes") and folder.layout == "splits"
    assert paths["test"] == {f"test/{c}/{i}.jpg" for c in ("no", "yes") for i in range(6)}
    carved = paths["val"] | paths["train"]
    assert all(p.startswith("train/") for p in carved) and len(carved) == 80
    assert 8 <= len(paths["val"]) <= 32  # about a quarter of train

    for name in ("no", "yes"):
        touch(root / "val" / name / "v.jpg")
    folder = open_image_folder(root, workers=0)
    paths = all_paths(folder)
    assert paths["val"] == {"val/no/v.jpg", "val/yes/v.jpg"} and len(paths["train"]) == 80


def test_split_layout_classes_must_agree(tmp_path):
    touch(tmp_path / "train/a/1.png"), touch(tmp_path / "train/b/1.png")
    touch(tmp_path / "test/a/1.png"), touch(tmp_path / "test/c/1.png")
    with pytest.raises(FolderError, match="only here: \\['c'\\].*missing here: \\['b'\\]") as error:
        open_image_folder(tmp_path)
    assert str(tmp_path / "test") in str(error.value)


# ---------------------------------------------------------------------------- stable splits
def test_splits_are_stable_and_near_the_fractions(tmp_path):
    for i in range(500):
        touch(tmp_path / ("a" if i % 2 else "b") / f"img{i}.png")
    before = all_paths(open_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.1))
    assert abs(len(before["test"]) - 50) < 25 and abs(len(before["val"]) - 100) < 35

    for i in range(500, 650):
        touch(tmp_path / ("a" if i % 2 else "b") / f"img{i}.png")
    after = all_paths(open_image_folder(tmp_path, val_fraction=0.2, test_fraction=0.1))
    for name in before:  # every old file stays where it was
        assert before[name] <= after[name]
    other_val = all_paths(open_image_folder(tmp_path, val_fraction=0.3, test_fraction=0.1))
    assert other_val["test"] == after["test"]  # the test set does not move with the validation fraction


# ---------------------------------------------------------------------------- decoding
def png16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 (display rotated 90 deg CW)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = RED
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def close(image: np.ndarray, colour, tolerance: int = 12) -> bool:
    """Every pixel of a (C, H, W) image within `tolerance` of one colour."""
    return bool(np.abs(image.astype(int) - np.array(colour).reshape(-1, 1, 1)).max() <= tolerance)


def test_decodes_every_format_to_rgb_uint8(tmp_path):
    palette = Image.new("P", (30, 10), 1)
    palette.putpalette([*RED, *GREEN] * 128)
    palette.save(tmp_path / "palette.png")
    transparent = Image.new("P", (10, 10), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.save(tmp_path / "palette_alpha.gif", transparency=0)
    files = {
        solid(tmp_path / "red.png"): RED, solid(tmp_path / "red.jpg", quality=95): RED,
        solid(tmp_path / "blue.bmp", BLUE): BLUE, solid(tmp_path / "blue.webp", BLUE, lossless=True): BLUE,
        solid(tmp_path / "green.gif", GREEN): GREEN, solid(tmp_path / "green.tiff", GREEN): GREEN,
        solid(tmp_path / "red.ppm"): RED, solid(tmp_path / "grey.pgm", 90, mode="L"): (90, 90, 90),
        solid(tmp_path / "grey.png", 90, mode="L"): (90, 90, 90),
        solid(tmp_path / "clear.png", (10, 20, 30, 0), mode="RGBA"): (255, 255, 255),  # on white
        solid(tmp_path / "opaque.png", (10, 20, 30, 255), mode="RGBA"): (10, 20, 30),
        solid(tmp_path / "half.png", (0, 0, 0, 128), mode="RGBA"): (127, 127, 127),
        solid(tmp_path / "cmyk.jpg", (0, 255, 255, 0), mode="CMYK", quality=95): RED,
        tmp_path / "palette.png": GREEN, tmp_path / "palette_alpha.gif": (255, 255, 255),
        png16(tmp_path / "sixteen.png", np.full((12, 12), 257 * 100)): (100, 100, 100),
    }
    for path, colour in files.items():
        image = decode_image(path, (8, 6), channels=3)
        assert image.shape == (3, 8, 6) and image.dtype == np.uint8, path.name
        assert close(image, colour, tolerance=3 if path.suffix in (".png", ".bmp", ".webp") else 12), \
            (path.name, image[:, 0, 0])


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.zeros((16, 16), np.int64)
    values[:, 8:] = 65535
    values[0, 0] = 257 * 7
    image = decode_image(png16(tmp_path / "halves.png", values), (16, 16), channels=1)
    expected = np.zeros((16, 16), np.uint8)
    expected[:, 8:], expected[0, 0] = 255, 7
    assert np.array_equal(image[0], expected)  # same size: no resampling, exact values


def test_exif_orientation_is_applied(tmp_path):
    image = decode_image(exif_rotated_jpeg(tmp_path / "rotated.jpg"), (40, 20), channels=3)
    assert image.shape == (3, 40, 20)
    assert close(image[:, 4:16], RED, 30) and close(image[:, 24:36], BLUE, 30)  # left half became the top


def test_aspect_kept_by_centre_crop(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10], pixels[:, 10:20], pixels[:, 20:] = RED, GREEN, BLUE
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = decode_image(tmp_path / "wide.png", (10, 10), channels=3)
    assert close(image[:, :, 2:8], GREEN, 3)  # the middle third, not a squashed whole


def test_one_channel_versus_three(tmp_path):
    path = solid(tmp_path / "red.png")
    grey, colour = decode_image(path, (5, 7), channels=1), decode_image(path, (5, 7), channels=3)
    assert grey.shape == (1, 5, 7) and colour.shape == (3, 5, 7)
    assert close(grey, (76,), 1) and close(colour, RED, 0)  # ITU-R 601 luma of pure red


# ---------------------------------------------------------------------------- unreadable files
def huge_png_header(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG whose header claims width x height RGB pixels and holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return touch(path, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.fixture
def with_bad_files(tmp_path) -> tuple[FolderSource, list[str], list[int]]:
    """A train split of 13 good images and four unreadable files; its names (relative paths) in order."""
    root = tmp_path / "mixed"
    for i in range(12):
        noise(root / "train" / ("a" if i % 2 else "b") / f"good{i:02}.png", seed=i)
    touch(root / "train/a/random.png", np.random.default_rng(0).bytes(300))
    good_jpeg = solid(root / "train/b/whole.jpg", size=(64, 64), quality=90).read_bytes()
    touch(root / "train/b/truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    touch(root / "train/a/empty.png")
    huge_png_header(root / "train/b/bomb.png")
    solid(root / "test/a/1.png"), solid(root / "test/b/1.png")
    source = open_image_folder(root, image_size=(10, 10), val_fraction=0.0, workers=0).train
    names = [str(source.paths[i]) for i in range(len(source))]
    assert len(names) == 17
    bad = [str(root / "train" / n) for n in ("a/random.png", "b/truncated.jpg", "a/empty.png", "b/bomb.png")]
    return source, bad, names


def test_unreadable_files_are_skipped_and_reported(with_bad_files):
    source, bad, names = with_bad_files
    [(images, labels)] = list(source.batches([torch.arange(len(source))]))
    good = [i for i, n in enumerate(names) if str(source.root / n) not in bad]
    assert set(source.skipped) == set(bad)
    assert images.shape == (len(good), 3, 10, 10) and torch.equal(labels, source.labels[good])
    for row, i in enumerate(good):
        assert np.array_equal(images[row].numpy(), decode_image(source.path(i), (10, 10), 3))
    reasons = {Path(p).name: r for p, r in source.skipped.items()}
    assert reasons["empty.png"] == "empty file" and reasons["bomb.png"].startswith("too large")
    assert "truncated" in reasons["truncated.jpg"].lower() and "cannot identify" in reasons["random.png"]


def test_a_batch_of_only_unreadable_files_is_empty(with_bad_files):
    source, bad, names = with_bad_files
    index = torch.tensor([names.index(str(Path(p).relative_to(source.root))) for p in bad])
    [(images, labels)] = list(source.batches([index]))
    assert images.shape == (0, 3, 10, 10) and images.dtype == torch.uint8
    assert labels.shape == (0,) and labels.dtype == torch.int64 and set(source.skipped) == set(bad)


def test_workers_give_the_same_batches_in_the_same_order(with_bad_files):
    source, bad, _ = with_bad_files
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).split(5)
    source.workers = 0
    serial = list(source.batches(order))
    source.skipped.clear()
    source.workers = 2
    parallel = list(source.batches(order))
    assert len(serial) == len(parallel) == len(order)
    for (a, la), (b, lb) in zip(serial, parallel):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert set(source.skipped) == set(bad)  # recorded in the main process from the workers' reports


@pytest.mark.parametrize("side", [8_000, 10_000])  # 64 Mpx: over our limit only; 100 Mpx: Pillow's too
def test_a_real_pixel_bomb_is_refused_from_its_header(tmp_path, side):
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # tens of megapixels, a few kB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageTooLarge, match="more than the 50,000,000 allowed|decompression bomb"):
        decode_image(path, (32, 32), 3)
    for split in ("train", "test"):
        for name in ("a", "b"):
            solid(tmp_path / "set" / split / name / "ok.png")
    path.rename(tmp_path / "set/train/a/bomb.png")
    source = open_image_folder(tmp_path / "set", val_fraction=0, workers=2).train
    [(images, labels)] = list(source.batches([torch.arange(len(source))]))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    assert list(source.skipped) == [str(tmp_path / "set/train/a/bomb.png")]
    assert next(iter(source.skipped.values())).startswith("too large")


# ---------------------------------------------------------------------------- what is counted
def test_non_images_ignored_and_hidden_entries_skipped(classes_root):
    touch(classes_root / "dog/notes.txt"), touch(classes_root / "cat/deep/labels.csv"), touch(classes_root / "README")
    for hidden in ("dog/.hidden.png", ".cache/x.png", "cat/.git/y.jpg"):
        touch(classes_root / hidden)
    touch(classes_root / "bird/UPPER.JPEG")
    folder = open_image_folder(classes_root, workers=0)
    assert folder.ignored == 3 and folder.classes == ("bird", "cat", "dog")
    names = set().union(*all_paths(folder).values())
    assert "bird/UPPER.JPEG" in names and len(names) == 91


def test_describe_digest_follows_the_files(classes_root):
    first = open_image_folder(classes_root, workers=0).describe()
    assert open_image_folder(classes_root, workers=0).describe() == first
    noise(classes_root / "cat/new.png", seed=999)
    assert open_image_folder(classes_root, workers=0).describe()["digest"] != first["digest"]


def test_path_table_round_trips_any_name():
    names = [b"a/b.png", "caf\u00e9/\u732b.jpg".encode(), b"x" * 300, b"odd/\xff.png"]
    table = PathTable.from_paths(names)
    assert len(table) == 4 and [table[i] for i in range(4)] == [n.decode("utf-8", "surrogateescape") for n in names]
    picked = table.take(np.array([3, 1]))
    assert [picked[0], picked[1]] == [table[3], table[1]] and table.blob.dtype == np.uint8


# ---------------------------------------------------------------------------- errors name the path
def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(FolderError, match="no such folder") as error:
        open_image_folder(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)
    touch(tmp_path / "file.png")
    with pytest.raises(FolderError, match="not a directory") as error:
        open_image_folder(tmp_path / "file.png")
    assert str(tmp_path / "file.png") in str(error.value)


def test_fewer_than_two_classes(tmp_path):
    touch(tmp_path / "only/1.png"), touch(tmp_path / "loose.png")
    with pytest.raises(FolderError, match="at least 2.*found 1 \\(only\\).*1 loose files") as error:
        open_image_folder(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_class_without_images_is_named(tmp_path):
    touch(tmp_path / "a/1.png"), touch(tmp_path / "b/readme.txt")
    with pytest.raises(FolderError, match="class folder 'b' holds no images") as error:
        open_image_folder(tmp_path)
    assert str(tmp_path / "b") in str(error.value)


def test_empty_split_says_counts_and_fractions(tmp_path):
    touch(tmp_path / "a/1.png"), touch(tmp_path / "b/1.png")
    with pytest.raises(FolderError, match="split is empty \\(2 images; drawn: val 10%, test 10% of each class") \
            as error:
        open_image_folder(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "its own folder beside train/" in str(error.value)  # advice a user can follow: no key sets the fractions


def test_split_layout_needs_train_and_test(tmp_path):
    touch(tmp_path / "train/a/1.png"), touch(tmp_path / "train/b/1.png")
    with pytest.raises(FolderError, match="needs both") as error:
        open_image_folder(tmp_path)
    assert str(tmp_path / "test") in str(error.value)


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"image_size": (0, 4)}, {"test_fraction": 0},
                                    {"val_fraction": 0.5, "test_fraction": 0.5}])
def test_bad_arguments(tmp_path, kwargs):
    touch(tmp_path / "a/1.png"), touch(tmp_path / "b/1.png")
    with pytest.raises(FolderError):
        open_image_folder(tmp_path, **kwargs)


def test_a_class_called_train_is_a_class_when_its_folder_holds_pictures(tmp_path):
    for name in ("train", "car", "bus"):
        for i in range(10):
            solid(tmp_path / "vehicles" / name / f"{i}.png")
    folder = open_image_folder(tmp_path / "vehicles")
    assert folder.classes == ("bus", "car", "train") and folder.layout == "classes"
    assert class_names(tmp_path / "vehicles") == ("bus", "car", "train")
