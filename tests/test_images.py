"""The one image reader: its pixel policy, and the same pixels for a file in training and in predict."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import images
from cnnlab.data.folder import open_image_folder
from cnnlab.use.predict import Predictor


def drawing(size=(40, 30)) -> np.ndarray:
    """uint8 RGB (H, W, 3): a dark diagonal bar on a light field, with some colour."""
    h, w = size
    rows, cols = np.indices((h, w))
    rgb = np.full((h, w, 3), 230, np.uint8)
    bar = np.abs(rows * w / h - cols) < 4
    rgb[bar] = (20, 60, 140)
    return rgb


def transparent_png(path):
    rgba = np.dstack([drawing(), np.where(drawing()[:, :, 0] < 100, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def sixteen_bit_png(path):
    grey = (np.indices((30, 40)).sum(axis=0) * 900).clip(0, 65535).astype(np.uint16)
    Image.fromarray(grey).save(path)  # mode I;16
    return path


def cmyk_jpeg(path):
    Image.fromarray(drawing()).convert("CMYK").save(path, "JPEG", quality=95)
    return path


def exif_rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(drawing()).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    return path


def transparent_palette_gif(path):
    rgba = Image.fromarray(np.dstack([drawing(), np.where(drawing()[:, :, 0] < 100, 255, 0).astype(np.uint8)]))
    rgba.convert("P").save(path, transparency=0)
    return path


MAKERS = {"transparent.png": transparent_png, "sixteen-bit.png": sixteen_bit_png, "cmyk.jpg": cmyk_jpeg,
          "rotated.jpg": exif_rotated_jpeg, "palette.gif": transparent_palette_gif}


# ------------------------------------------------------------------------------------ the policy
@pytest.mark.unit
def test_sixteen_bit_grey_is_scaled_exactly():
    values = np.array([[0, 257, 257 * 128], [65535, 65534, 128]], dtype=np.uint16)
    out = np.asarray(images.normalized(Image.fromarray(values)))
    assert out.tolist() == [[0, 1, 128], [255, 255, 0]]  # round(v * 255 / 65535)


@pytest.mark.unit
def test_transparency_gets_a_background_that_contrasts_with_the_drawing():
    dark_ink = np.zeros((20, 20, 4), np.uint8)
    dark_ink[5:15, 9:11] = (0, 0, 0, 255)  # a black stroke, the rest transparent
    light_ink = dark_ink.copy()
    light_ink[5:15, 9:11, :3] = 255  # a white stroke
    on_dark, on_light = (np.asarray(images.normalized(Image.fromarray(a, "RGBA"))) for a in (dark_ink, light_ink))
    assert (on_dark[0, 0] == 255).all() and (on_dark[10, 10] == 0).all()  # black on white
    assert (on_light[0, 0] == 0).all() and (on_light[10, 10] == 255).all()  # white on black


@pytest.mark.unit
def test_grey_with_alpha_stays_grey_and_cmyk_becomes_rgb():
    assert images.normalized(Image.new("LA", (4, 4), (100, 255))).mode == "L"
    assert images.normalized(Image.new("CMYK", (4, 4))).mode == "RGB"
    assert images.normalized(Image.new("1", (4, 4))).mode == "L"


@pytest.mark.unit
def test_an_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (8, 8), level) for level in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(images.read_pixels(tmp_path / "anim.gif", (8, 8), 1)).max() < 50


@pytest.mark.unit
def test_exif_rotation_is_applied(tmp_path):
    upright = images.open_image(exif_rotated_jpeg(tmp_path / "r.jpg"))
    assert upright.size == (30, 40)  # (width, height) of the drawing, not of the stored sideways pixels


@pytest.mark.unit
def test_read_pixels_crops_the_centre_to_the_target_aspect():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # only the centre third is white
    out = images.read_pixels(io.BytesIO(png(wide)), (10, 10), 1)
    assert out.shape == (10, 10) and out.min() > 200


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------- one reader, training and use
@pytest.mark.parametrize("channels", [1, 3])
def test_a_file_gives_the_same_pixels_to_a_folder_run_and_to_predict(tmp_path, channels):
    """The tricky files (transparent, 16-bit, CMYK, EXIF-rotated, transparent palette) through a folder
    run's training path and through `cnnlab predict`'s preparation of the same run: identical pixels."""
    root = tmp_path / "pictures"
    for label in ("a", "b"):
        for split in ("train", "val", "test"):
            (root / split / label).mkdir(parents=True)
        for name, make in MAKERS.items():
            make(root / "train" / label / name)
        transparent_png(root / "val" / label / "x.png")
        transparent_png(root / "test" / label / "x.png")
    run = train_folder_run(tmp_path, root, channels)
    predictor = Predictor.from_run(run)
    assert predictor.recipe == ("photos" if channels == 3 else "photos-grey")
    folder = open_image_folder(root, (16, 16), channels, workers=0)
    split = folder.train
    [(batch, _)] = list(split.batches([torch.arange(len(split))]))  # what the trainer reads: (N, C, H, W)
    for i in range(len(split)):
        trained_on = batch[i].permute(1, 2, 0).numpy()  # (H, W, C)
        predicted_on = predictor.prepare(split.path(i))
        predicted_on = predicted_on[:, :, None] if predicted_on.ndim == 2 else predicted_on
        assert np.array_equal(trained_on, predicted_on), split.path(i).name


def train_folder_run(tmp_path, root, channels: int):
    from cnnlab import pipeline
    from cnnlab.config import load_config

    config = load_config("perceptron", overrides=["epochs=1", "data.image_size=16", f"data.channels={channels}",
                                                  "data.workers=0", "batch_size=4"], data={"dataset": str(root)})
    return pipeline.train(config, tmp_path / "runs", progress=False).run


def test_a_fifo_given_as_a_picture_is_refused_without_blocking(tmp_path):
    import os
    import subprocess
    import sys

    os.mkfifo(tmp_path / "photo.png")
    with pytest.raises(images.ImageReadError, match="a FIFO \\(named pipe\\), not a regular file"):
        images.open_image(tmp_path / "photo.png")
    done = subprocess.run([sys.executable, "-m", "cnnlab", "convolve", str(tmp_path / "photo.png"), "--out",
                           str(tmp_path / "out.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
