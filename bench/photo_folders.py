"""Folders of photos to judge cnnlab on "your own images": real pictures, rendered as files of mixed sizes,
formats, colours and backdrops, one sub-folder per class.

No folder of colour photos can be downloaded on the project's machines, so these are made from real
pictures that are here: the IDX datasets' images (garments, handwritten digits) photographed, in effect,
on backdrops (plain studio colours, gradients, paper, and crops of real photos given with --backdrops),
at random sizes, aspect ratios, placements and tilts, saved as JPEG, PNG, WebP or BMP, some in grey.

  python bench/photo_folders.py products OUT --idx-dir DIR_OF_FASHION_MNIST [--backdrops DIR] [--per-class 120]
  python bench/photo_folders.py digits OUT --idx-dir DIR_OF_MNIST [--backdrops DIR]
  python bench/photo_folders.py plain OUT --idx-dir DIR_OF_FASHION_MNIST [--per-class 108]

`products`: 10 classes of garments (Fashion-MNIST's training images), --per-class files each (1,200 by default).
`digits`: 4 classes of handwritten digits (MNIST 0-3) in coloured ink, imbalanced 100/70/40/20 (230 files).
`plain`: no photograph at all, the ceiling the others are judged against: --per-class of Fashion-MNIST's training
garments as the 28x28 grey PNGs they are, under train/, and all 10,000 test garments under test/ (a test split
large enough to tell one point from noise).
Seeded: the same command writes the same files.
"""
from __future__ import annotations

import argparse
import colorsys
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")
FORMATS = (("jpg", 0.55), ("png", 0.25), ("webp", 0.15), ("bmp", 0.05))  # (extension, share of files)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a NumPy array (only the unsigned-byte type these datasets use)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_backdrops(folder: Path | None) -> list[Image.Image]:
    """Real photos to crop backdrops from (any image files in `folder`), or none."""
    if folder is None:
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    return [Image.open(p).convert("RGB") for p in files]


def random_colour(rng: np.random.Generator, light: tuple[float, float], saturation: tuple[float, float]
                  ) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*light))
    return int(r * 255), int(g * 255), int(b * 255)


def backdrop(rng: np.random.Generator, size: tuple[int, int], photos: list[Image.Image], paper: bool) -> Image.Image:
    """A (W, H) background: a plain colour, a gradient, paper with grain, or a blurred crop of a real photo."""
    w, h = size
    kind = rng.choice(["plain", "gradient", "grain", "photo"] if photos else ["plain", "gradient", "grain"],
                      p=[0.3, 0.25, 0.2, 0.25] if photos else [0.4, 0.35, 0.25])
    light = (0.75, 1.0) if paper else (0.35, 1.0)
    if kind == "photo":
        photo = photos[rng.integers(len(photos))]
        side = int(rng.uniform(0.3, 0.9) * min(photo.size))
        x, y = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        crop = photo.crop((x, y, x + side, y + side)).resize((w, h), Image.Resampling.BILINEAR)
        return crop.filter(ImageFilter.GaussianBlur(rng.uniform(1, 4)))
    top = np.array(random_colour(rng, light, (0.0, 0.4)), dtype=np.float32)
    if kind == "plain":
        return Image.new("RGB", size, tuple(int(c) for c in top))
    bottom = np.array(random_colour(rng, light, (0.0, 0.4)), dtype=np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()
    if kind == "grain":
        pixels += rng.normal(0, rng.uniform(4, 14), (h, w, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def place(canvas: Image.Image, shape: np.ndarray, ink: tuple[int, int, int], rng: np.random.Generator,
          shading: bool, fill: tuple[float, float]) -> Image.Image:
    """Paint a 28x28 grey picture (0 background, 255 object) onto the canvas in `ink`, scaled, tilted, moved."""
    w, h = canvas.size
    side = int(min(w, h) * rng.uniform(*fill))
    mask = Image.fromarray(shape).resize((side, side), Image.Resampling.BICUBIC)
    mask = mask.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC)
    alpha = np.asarray(mask, dtype=np.float32) / 255
    if shading:  # the object's own texture shades its colour, as light does on cloth
        tone = 0.45 + 0.55 * alpha
        colour = (np.array(ink, dtype=np.float32) * tone[..., None]).clip(0, 255)
        matte = np.clip(alpha * 2.5, 0, 1)  # the garment is opaque where Fashion-MNIST's pixels are faint
    else:
        colour = np.broadcast_to(np.array(ink, dtype=np.float32), (side, side, 3))
        matte = alpha
    x = int(rng.integers(0, max(1, w - side + 1)))
    y = int(rng.integers(0, max(1, h - side + 1)))
    region = np.asarray(canvas.crop((x, y, x + side, y + side)), dtype=np.float32)
    blended = region * (1 - matte[..., None]) + colour * matte[..., None]
    canvas.paste(Image.fromarray(blended.astype(np.uint8)), (x, y))
    return canvas


def photograph(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a camera adds: a little blur, sensor noise, a colour cast; some pictures in grey."""
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * rng.uniform(0.85, 1.15, 3) + rng.normal(0, rng.uniform(1, 6), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("L") if rng.random() < 0.08 else image


def save(image: Image.Image, folder: Path, stem: str, rng: np.random.Generator) -> None:
    names, shares = zip(*FORMATS)
    extension = str(rng.choice(names, p=shares))
    folder.mkdir(parents=True, exist_ok=True)
    options = {"quality": int(rng.integers(60, 95))} if extension in ("jpg", "webp") else {}
    image.save(folder / f"{stem}.{extension}", **options)


def canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """(W, H): 64 to 480 pixels on the long side, aspect ratios from 3:5 to 5:3."""
    long_side = int(rng.integers(64, 481))
    aspect = rng.uniform(0.6, 1.67)
    return (long_side, max(32, int(long_side / aspect))) if aspect >= 1 else (max(32, int(long_side * aspect)),
                                                                             long_side)


def make_products(out: Path, idx_dir: Path, photos: list[Image.Image], per_class: int, seed: int) -> int:
    images = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    for label, name in enumerate(FASHION_CLASSES):
        chosen = rng.choice(np.flatnonzero(labels == label), per_class, replace=False)
        for k, index in enumerate(chosen):
            canvas = backdrop(rng, canvas_size(rng), photos, paper=False)
            ink = random_colour(rng, (0.25, 1.0), (0.2, 1.0))
            canvas = place(canvas, images[index], ink, rng, shading=True, fill=(0.55, 0.95))
            save(photograph(canvas, rng), out / name, f"{name}-{k:04d}", rng)
    return per_class * len(FASHION_CLASSES)


def make_plain(out: Path, idx_dir: Path, per_class: int, seed: int) -> int:
    """The garments themselves (28x28 grey), `per_class` a class to train on and every test garment to test on."""
    rng = np.random.default_rng(seed)
    written = 0
    for split, stem, count in (("train", "train", per_class), ("test", "t10k", None)):
        images = read_idx(idx_dir / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(idx_dir / f"{stem}-labels-idx1-ubyte.gz")
        for label, name in enumerate(FASHION_CLASSES):
            indices = np.flatnonzero(labels == label)
            chosen = indices if count is None else rng.choice(indices, count, replace=False)
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, index in enumerate(chosen):
                Image.fromarray(images[index]).save(folder / f"{name}-{k:04d}.png")
            written += len(chosen)
    return written


def make_digits(out: Path, idx_dir: Path, photos: list[Image.Image], seed: int) -> int:
    images = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    counts = {"zero": 100, "one": 70, "two": 40, "three": 20}  # imbalanced, as a user's own collection is
    for label, (name, count) in enumerate(counts.items()):
        for k, index in enumerate(rng.choice(np.flatnonzero(labels == label), count, replace=False)):
            canvas = backdrop(rng, canvas_size(rng), photos, paper=True)
            ink = random_colour(rng, (0.05, 0.5), (0.3, 1.0))  # dark ink on light paper
            canvas = place(canvas, images[index], ink, rng, shading=False, fill=(0.45, 0.9))
            save(photograph(canvas, rng), out / name, f"{name}-{k:04d}", rng)
    return sum(counts.values())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["products", "digits", "plain"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--idx-dir", type=Path, required=True, help="folder with the dataset's IDX .gz files")
    parser.add_argument("--backdrops", type=Path, help="folder of real photos to crop backgrounds from")
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    photos = load_backdrops(args.backdrops)
    if args.kind == "products":
        n = make_products(args.out, args.idx_dir, photos, args.per_class, args.seed)
    elif args.kind == "plain":
        n = make_plain(args.out, args.idx_dir, args.per_class, args.seed)
    else:
        n = make_digits(args.out, args.idx_dir, photos, args.seed)
    print(f"{args.out}: {n} files")


if __name__ == "__main__":
    main(sys.argv[1:])
