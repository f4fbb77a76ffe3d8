"""Named datasets: files, checksums, mirrors, class names and how their images were made."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.config import Config, DataConfig, load_config, read_yaml
from cnnlab.errors import UserError
from cnnlab.suggest import did_you_mean

SPLITS = ("train", "test")
FORMATS = ("idx", "cifar-binary")  # how a dataset's files are laid out (see DatasetSpec.format)


class UnknownDataset(UserError, ValueError):
    """A dataset name that is not registered."""


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset under its standard name: an IDX file, or an archive read member by member."""

    name: str  # standard file name, e.g. "train-images-idx3-ubyte.gz"
    sha256: str | None  # of the decompressed payload: survives recompression (Debian recompresses)
    gz_sha256: str | None = None  # of the canonical .gz download, where the payload digest is unknown
    # An archive nobody recompresses is checked by the digest of its download alone (gz_sha256):
    # hashing its payload would mean decompressing it in full (170 MB for CIFAR-10) just to hash it.
    archive: bool = False


@dataclass(frozen=True)
class Archive:
    """One .tar.gz holding a dataset's record files as members (CIFAR's binary batches)."""

    file: DataFile  # the download, with archive=True
    members: dict[str, tuple[str, ...]]  # split -> member paths inside the archive, in reading order
    counts: dict[str, int]  # split -> records expected over all its members
    meta: str | None = None  # member listing the class names one per line, checked against the spec's classes
    extras: tuple[str, ...] = ()  # other members allowed (and ignored), e.g. a readme


@dataclass(frozen=True)
class DatasetSpec:
    """Everything cnnlab knows about a named dataset."""

    name: str
    title: str
    classes: tuple[str, ...]
    files: dict[str, tuple[DataFile, DataFile]] = field(default_factory=dict)  # idx: split -> (images, labels)
    image_shape: tuple[int, int, int] = (28, 28, 1)  # (H, W, C), channels-last as the lesson writes it
    format: str = "idx"  # "idx": four IDX files (`files`); "cifar-binary": one tar.gz of CIFAR batches (`archive`)
    archive: Archive | None = None  # cifar-binary only
    mirrors: tuple[str, ...] = ()  # base URLs tried in order; empty for packaged samples
    val_size: int = 5000  # images held out of the training set for validation
    recipe: str = "digits"  # how the images were prepared, so user images can be prepared alike
    packaged: bool = False  # shipped inside cnnlab itself (the offline samples)
    apt_package: str | None = None  # Debian package that installs the files system-wide
    source: str = ""
    licence: str = ""
    notes: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"dataset {self.name!r}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if (self.format == "cifar-binary") != (self.archive is not None):
            raise ValueError(f"dataset {self.name!r}: an archive is given for, and only for, format cifar-binary")

    def all_files(self) -> list[DataFile]:
        """The files that must be present in a dataset's folder."""
        if self.archive is not None:
            return [self.archive.file]
        return [f for split in SPLITS for f in self.files[split]]


def _idx_files(digests: dict[str, tuple[str | None, str | None]]) -> dict[str, tuple[DataFile, DataFile]]:
    def file(name: str) -> DataFile:
        return DataFile(name, *digests[name])

    return {
        "train": (file("train-images-idx3-ubyte.gz"), file("train-labels-idx1-ubyte.gz")),
        "test": (file("t10k-images-idx3-ubyte.gz"), file("t10k-labels-idx1-ubyte.gz")),
    }


DIGITS = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

MNIST = DatasetSpec(
    name="mnist",
    title="MNIST handwritten digits",
    classes=DIGITS,
    files=_idx_files({
        # The payload digest of the official train images is not recorded here: downloads are
        # checked against the digest of the official .gz instead.
        "train-images-idx3-ubyte.gz": (None, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": ("65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                                      "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": ("ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                                      "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    }),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    recipe="digits",
    source="Y. LeCun, C. Cortes, C. J. C. Burges, The MNIST database of handwritten digits",
    licence="CC BY-SA 3.0",
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    title="Fashion-MNIST (Zalando article images)",
    classes=FASHION_CLASSES,
    files=_idx_files({
        "train-images-idx3-ubyte.gz": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", None),
        "train-labels-idx1-ubyte.gz": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", None),
        "t10k-images-idx3-ubyte.gz": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", None),
        "t10k-labels-idx1-ubyte.gz": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", None),
    }),
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    recipe="objects",
    apt_package="dataset-fashion-mnist",
    source="H. Xiao, K. Rasul, R. Vollgraf, Fashion-MNIST (Zalando Research), arXiv:1708.07747",
    licence="MIT",
)

# Small real samples shipped inside the package, so the default run and the tests work offline.
# Drawn by scripts/make_samples.py; see data/samples/README.md for provenance and licences.
MNIST_SAMPLE = DatasetSpec(
    name="mnist-sample",
    title="MNIST sample (4,000 train / 1,000 test, drawn from the official MNIST test set)",
    classes=DIGITS,
    files=_idx_files({
        "train-images-idx3-ubyte.gz": ("eb3f7580ad839bc88e0ccc00d5c33a0c5ffe28b538776e4577fa8b31db177459", None),
        "train-labels-idx1-ubyte.gz": ("5f6d7070961d5ca7004bb878bdee70bb13a68da2bb4f66d20205b0cc1219ec08", None),
        "t10k-images-idx3-ubyte.gz": ("b4f5ea0942d361006d417e6aa88b813f04d6c2ec1ebd28ab3ac9c9b2cca44b35", None),
        "t10k-labels-idx1-ubyte.gz": ("65b4e835b991348a1bbf6d210d3bc3a826665ebd5e047e66840e4076325ade6c", None),
    }),
    val_size=500,
    recipe="digits",
    packaged=True,
    source=MNIST.source,
    licence=MNIST.licence,
)

FASHION_MNIST_SAMPLE = DatasetSpec(
    name="fashion-mnist-sample",
    title="Fashion-MNIST sample (4,000 train / 1,000 test, drawn from the official files)",
    classes=FASHION_CLASSES,
    files=_idx_files({
        "train-images-idx3-ubyte.gz": ("d1f2e6d5469cc52f97a8863c0e59db31f6350ee3c44d4fa1e9a721dffa9f82ce", None),
        "train-labels-idx1-ubyte.gz": ("7178a8d7de48a2cf08f8a612c8605a7a38d6639fe74c5e97ae21b580bc95b193", None),
        "t10k-images-idx3-ubyte.gz": ("b089b9b70f226fb1cce42f4014c2bed7c86426e89f42e47cce26442ee1ead1be", None),
        "t10k-labels-idx1-ubyte.gz": ("7d1ca4f1bae94d86d77bf3b7c34710ae773090d38f5070ff2bbac75588f6af7d", None),
    }),
    val_size=500,
    recipe="objects",
    packaged=True,
    source=FASHION_MNIST.source,
    licence=FASHION_MNIST.licence,
)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_members(folder: str, train_batches: int = 5) -> dict[str, tuple[str, ...]]:
    """Member paths of CIFAR-10's binary batches in its archive: split -> batch files, in order."""
    return {"train": tuple(f"{folder}/data_batch_{i}.bin" for i in range(1, train_batches + 1)),
            "test": (f"{folder}/test_batch.bin",)}


# The binary version, never the python one (a pickle: loading it would run whatever code it holds).
CIFAR10 = DatasetSpec(
    name="cifar10",
    title="CIFAR-10 (Krizhevsky, 2009): 32x32 colour photos, 10 classes",
    classes=CIFAR10_CLASSES,
    image_shape=(32, 32, 3),
    format="cifar-binary",
    archive=Archive(
        # 170,052,171 bytes; the official MD5 is c32a1d4ab5d03f1284b67883e8d87530
        file=DataFile("cifar-10-binary.tar.gz", None,
                      "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd", archive=True),
        members=cifar_members("cifar-10-batches-bin"),
        counts={"train": 50_000, "test": 10_000},
        meta="cifar-10-batches-bin/batches.meta.txt",
        extras=("cifar-10-batches-bin/readme.html",),
    ),
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    val_size=5000,
    recipe="photos",
    source="A. Krizhevsky, Learning Multiple Layers of Features from Tiny Images, tech. report, "
           "University of Toronto, 2009 (https://www.cs.toronto.edu/~kriz/cifar.html)",
    licence="no licence stated; the authors ask that the tech report be cited when the dataset is used",
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (MNIST, FASHION_MNIST, MNIST_SAMPLE, FASHION_MNIST_SAMPLE, CIFAR10)
}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (the shipped samples register themselves this way)."""
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a named dataset; an unknown name gets the nearest valid one suggested."""
    try:
        return DATASETS[name]
    except KeyError:
        near = did_you_mean(name, DATASETS)
        # a run trained on a relative folder, opened from elsewhere, lands here: say where a folder was looked for
        if Path(name).is_dir():  # a folder, given to a function of registered datasets (load_dataset)
            folder = ("; that is an image folder: this takes registered names, and cnnlab.train(dataset=...) "
                      "and every command's --dataset take folders")
        else:
            folder = "" if near else f"; nor an image folder ({Path(name).absolute()} does not exist)"
        raise UnknownDataset(f"unknown dataset {name!r}{near} (known: {', '.join(DATASETS)}){folder}") from None


# -------------------------------------------------------------------- what a config's dataset is
def is_image_folder(name: str) -> bool:
    """A `data.dataset` that names a folder of class sub-folders rather than a registered dataset."""
    return name not in DATASETS and ("/" in name or Path(name).is_dir())


def dataset_recipe(data: DataConfig) -> str:
    """How user pictures are prepared for a model trained on this dataset (`cnnlab.use.recipes`)."""
    if is_image_folder(data.dataset):
        return "photos" if data.channels == 3 else "photos-grey"
    try:
        return get_dataset(data.dataset).recipe
    except UnknownDataset:
        return "digits"  # a dataset registered by a plugin that is not loaded now: MNIST-style is the default


def dataset_shape(data: DataConfig) -> tuple[tuple[int, int, int], int]:
    """(image shape (H, W, C), number of classes) of the configured dataset, without loading images."""
    if is_image_folder(data.dataset):
        from cnnlab.data.folder_layout import class_names  # folder names only: no image read, no torch

        # every image is fitted to image_size x image_size with `channels` channels (`cnnlab.data.folder`)
        return (data.image_size, data.image_size, data.channels), len(class_names(data.dataset))
    spec = get_dataset(data.dataset)
    return spec.image_shape, spec.num_classes


# -------------------------------------------------------------------- the model a dataset gets by default
PHOTOS_MODEL = "photos"  # the preset for colour image folders when no model is named
DEFAULT_MODEL_LINE = ("no model named: training 'photos', a small residual network with augmentation for image "
                      "folders read in colour (grey pictures too: --set data.channels=1 reads them grey; --model seed "
                      "is the lesson's CNN; cnnlab presets lists the others)")


def default_model(data: DataConfig) -> str:
    """The preset a dataset gets when no model is named: `photos` for a colour image folder, the lesson's
    `seed` for everything else (the named datasets, grey folders of digits)."""
    return PHOTOS_MODEL if is_image_folder(data.dataset) and data.channels == 3 else "seed"


def load_config_for(model: str | None, file: str | Path | None = None,
                    overrides: Sequence[str | tuple[str, Any]] | None = None,
                    **sections: dict) -> tuple[Config, str | None]:
    """`load_config` where `model` None means the dataset's default model (`default_model`); with the line
    that says which was chosen, or None when the model was named or is the lesson's."""
    own_model = file is not None and "model" in (read_yaml(file) or {})  # a config file that describes a network
    if model is not None or own_model:
        return load_config(model or "seed", file, overrides, **sections), None
    # The dataset decides the model, and the model decides which keys exist: the data settings are read first,
    # so that a misspelt key is checked against the model that will train (photos' knobs for a folder, not seed's)
    data_only = [item for item in overrides or [] if override_key(item).startswith("data.")]
    chosen = default_model(load_config("seed", file, data_only, **sections).data)
    return load_config(chosen, file, overrides, **sections), None if chosen == "seed" else DEFAULT_MODEL_LINE


def override_key(item: str | tuple[str, Any]) -> str:
    """The key of a `key=value` override (or of a (key, value) pair)."""
    return item[0] if isinstance(item, tuple) else item.split("=", 1)[0].strip()
