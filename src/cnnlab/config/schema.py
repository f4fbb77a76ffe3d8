"""The config's shape: typed dataclasses for data, model and training, and their range checks.

Every default has a comment with its unit or reason. No torch here: configs are read, checked and
explained without building anything.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from cnnlab.config.activations import ACTIVATIONS
from cnnlab.errors import UserError
from cnnlab.suggest import did_you_mean

POOLS = (None, "max", "avg")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "onecycle", "cosine")
POOLINGS = ("flatten", "global_avg", "global_max")  # how the last feature maps become the head's input
STOP_METRICS = ("val_loss", "val_accuracy")  # what early stopping watches (lower loss, higher accuracy is better)
SAMPLINGS = ("shuffle", "balanced")
RESIZES = ("crop", "pad", "squish")  # how an image folder's pictures meet the square size (cnnlab.images.fitted)
PRECISIONS = ("float32", "bf16-mixed")  # the training step's arithmetic (weights are float32 in both)
HALF_PRECISIONS = ("bf16", "bfloat16", "fp16", "float16", "half", "16", "16-mixed", "bf16_mixed", "mixed", "amp")


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key and what was expected."""


@dataclass
class ConvBlock:
    """Conv2D -> [BatchNorm] -> activation -> [pool] -> [dropout] (with pool_first: Conv2D -> pool -> ...)."""

    filters: int = 32  # output channels (feature maps)
    kernel_size: int | list[int] = 3  # pixels; one int, or [height, width]
    stride: int = 1  # pixels the kernel moves per step
    padding: str | int = "valid"  # "valid" shrinks the image, "same" keeps its size, or zeros per side
    activation: str = "relu"
    batch_norm: bool = False  # normalise each channel over the batch (helps deeper nets train fast)
    pool: str | None = None  # "max", "avg" or None
    pool_size: int = 2  # a 2x2 pool halves each side
    pool_first: bool = False  # pool right after the conv, before batch norm: 4x cheaper BN (airbench's order)
    dropout: float = 0.0  # fraction of activations zeroed in training, after the pool
    whiten: bool = False  # first layer only: kernels set from the training images' patches, not trained (airbench)


@dataclass
class DenseLayer:
    """[dropout] -> Linear -> activation. Dropout on the layer's input, where the lesson puts it."""

    units: int = 128
    activation: str = "relu"
    dropout: float = 0.0


@dataclass
class ResidualStage:
    """`blocks` ResNet basic blocks: conv 3x3 -> BN -> act -> [dropout] -> conv 3x3 -> BN, plus the block's
    input (a 1x1 conv + BN projection when the shape changes), then act."""

    blocks: int = 2  # basic blocks in the stage
    filters: int = 64  # output channels of every block (times model.widen)
    stride: int = 1  # of the stage's first block: 2 halves the feature maps' height and width
    kernel_size: int = 3  # pixels, odd: the blocks pad to keep the size
    activation: str = "relu"
    dropout: float = 0.0  # between each block's two convs (wide ResNets' dropout)


@dataclass
class ModelConfig:
    """conv blocks -> residual stages -> pooling -> dense layers -> classifier (softmax over the classes).

    The lesson's networks are conv blocks -> flatten -> dense; a ResNet adds stages and pools globally.
    """

    name: str = "custom"
    conv: list[ConvBlock] = field(default_factory=list)  # the stem: plain conv blocks, as the lesson writes them
    stages: list[ResidualStage] = field(default_factory=list)  # residual stages after the conv blocks
    widen: int = 1  # every stage's filters are multiplied by this (wide ResNets: WRN-d-k has widen k)
    pooling: str = "flatten"  # flatten (every value to the head), global_avg or global_max (one value per map)
    dense: list[DenseLayer] = field(default_factory=list)
    classifier_dropout: float = 0.0  # dropout on the classifier's input


@dataclass
class DataConfig:
    dataset: str = "mnist-sample"  # a registered dataset name (`cnnlab datasets list`) or an image folder's path
    data_dir: str | None = None  # folder holding <dataset>/<IDX files>; None: $CNNLAB_DATA, cache, system
    val_size: int | None = None  # training images held out for validation; None: the dataset's default
    allow_checksum_mismatch: bool = False  # use local files whose checksums differ (recorded in the run)
    # Image folders only (one sub-folder per class): images are fitted to image_size x image_size.
    image_size: int = 32  # pixels per side the images are resized to
    resize: str = "crop"  # crop: the largest centred square; pad: the whole picture, bars of its border colour; squish
    channels: int = 3  # 3: colour (RGB), 1: greyscale
    workers: int | None = None  # processes decoding images in parallel; None: min(4, cores); 0: in the main process
    # MB of decoded pixels an image folder may hold in memory: a folder that fits is decoded once, not every epoch
    memory_mb: int = 2048


@dataclass
class EarlyStopping:
    """Stop when the validation metric has not improved for `patience` epochs; keep the best epoch's weights."""

    # epochs without improvement before training stops (judged at validated epochs: see train.val_every); 0: off
    patience: int = 0
    metric: str = "val_loss"  # val_loss (lower is better) or val_accuracy (higher is better)
    min_delta: float = 0.0  # a change smaller than this is not an improvement (loss units, or accuracy 0-1)


@dataclass
class TrainConfig:
    """How the model learns: optimiser, schedule, augmentation, averaging, test-time augmentation."""

    epochs: int = 4
    batch_size: int = 32  # images per optimisation step
    optimizer: str = "adam"  # adam, adamw or sgd
    lr: float | str = 1e-3  # peak learning rate, or auto: the learning-rate finder's suggestion (`cnnlab lr-find`)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    decay_norms_and_biases: bool = True  # false: weight decay skips biases and batch-norm scales (1-D tensors)
    norm_bias_lr_scale: float = 1.0  # batch-norm biases learn at this multiple of the learning rate (airbench: 64)
    schedule: str = "constant"  # learning rate over the run: constant, onecycle or cosine
    label_smoothing: float = 0.0  # target probability moved from the true class to the others
    seed: int = 0  # seeds the validation split, initial weights, data order and dropout
    threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    augment_shift: int = 0  # pixels: each training image moved by up to this much, at random
    augment_flip: bool = False  # mirror half the training images at random (clothes, not digits)
    augment_erase: float = 0.0  # probability an image gets a random rectangle (2-33% of it) replaced by noise
    augment_rotate: float = 0.0  # degrees: each training image turned by up to this much either way, at random
    augment_zoom: float = 0.0  # each training image scaled by 1/(1+z) to 1+z at random (objects come at every size)
    augment_colour: float = 0.0  # colour jitter: channels shuffled with this probability, grey, brightness, contrast
    ema: float = 0.0  # averaged weights, evaluated and saved: decay per step (0.999: ~the last 1000 steps); 0: off
    lookahead: bool = False  # every 5 steps pull the weights toward a slow average of them, harder as the run ends
    tta: bool = False  # test-time augmentation: average the predictions for each image and its mirror
    tta_shift: int = 0  # pixels: also average over the image moved this far up, down, left and right
    channels_last: bool = True  # weights and batches stored (N, H, W, C): 1.5-2x faster conv/BN steps on CPU
    precision: str = "float32"  # float32, or bf16-mixed: the training step's convolutions and matmuls in bfloat16
    compile: bool = False  # the training step's forward and backward through torch.compile (slower on 2 CPU cores)
    sync_every: int | None = None  # steps between reading the loss back from the device; None: 1 on CPU, 20 on GPU
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (a GPU when torch sees one)
    val_every: int = 1  # epochs between validation passes (the last epoch is always validated)
    # images per forward pass when evaluating: small batches stay in cache (4-7x faster than 1000 on 2 cores)
    eval_batch_size: int = 256
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)  # stop on a stalled validation metric
    # balanced: weight each class's loss by n / (classes * its count); or one weight per class, in class order
    class_weights: str | list[float] | None = None
    sampling: str = "shuffle"  # shuffle: each image once per epoch; balanced: classes drawn equally often
    init_from: str | None = None  # a run directory whose weights start this run (its head kept if the classes match)
    freeze_epochs: int = 0  # epochs at the start in which the feature layers stay fixed (batch norm still learns)
    features_lr_scale: float = 1.0  # the feature layers learn at this multiple of the learning rate (fine-tuning)
    # false: a finished run keeps its last checkpoint only (what --resume reads); true: the previous one too
    keep_checkpoints: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


# ------------------------------------------------------------------------------------ validation
# Bounds on what a config may ask for: past these a typo (filters: 40960) would allocate gigabytes or
# run for days before failing, so it is refused at once, naming the key.
MAX_FILTERS = 4096  # feature maps per conv layer
MAX_KERNEL = 64  # pixels per kernel side, stride, padding, pool size
MAX_UNITS = 65536  # units of a dense layer
MAX_BLOCKS = 64  # residual blocks per stage; also the widen factor
MAX_EPOCHS = 10_000
MAX_BATCH = 65536  # images per step or per evaluation pass
MAX_SEED = 2**32 - 1  # seeds numpy and torch alike
MAX_IMAGE_SIZE = 1024  # pixels per side of an image-folder image
MAX_WORKERS = 64
MAX_MEMORY_MB = 1 << 20  # 1 TB of decoded pixels: a bound on typos, not on machines
MAX_THREADS = 256


def validate(config: Config) -> None:
    """Range and choice checks that types alone cannot express; a ConfigError names the key and the range."""
    for i, block in enumerate(config.model.conv):
        where = f"model.conv[{i}]"
        bounded(block.filters, 1, MAX_FILTERS, f"{where}.filters")
        sizes = block.kernel_size if isinstance(block.kernel_size, list) else [block.kernel_size]
        if len(sizes) not in (1, 2):
            raise ConfigError(f"{where}.kernel_size: expected an int or [height, width], found {block.kernel_size}")
        for size in sizes:
            bounded(size, 1, MAX_KERNEL, f"{where}.kernel_size")
        bounded(block.stride, 1, MAX_KERNEL, f"{where}.stride")
        if isinstance(block.padding, str) and block.padding not in ("valid", "same"):
            raise ConfigError(f"{where}.padding: expected 'valid', 'same' or an int >= 0, found {block.padding!r}")
        if isinstance(block.padding, int):
            bounded(block.padding, 0, MAX_KERNEL, f"{where}.padding")
        if block.padding == "same" and block.stride != 1:
            raise ConfigError(f"{where}: padding 'same' needs stride 1 in torch; use an int padding with stride > 1")
        choice(block.activation, ACTIVATIONS, f"{where}.activation")
        choice(block.pool, POOLS, f"{where}.pool")
        bounded(block.pool_size, 1, MAX_KERNEL, f"{where}.pool_size")
        fraction(block.dropout, f"{where}.dropout")
        if block.whiten and i:
            raise ConfigError(f"{where}.whiten: only the first conv layer can whiten (its kernels are fitted to the "
                              "images' patches, which only the first layer sees)")
        if block.whiten and block.stride != 1:
            raise ConfigError(f"{where}.whiten: a whitening layer has stride 1 (it sees every patch); found stride "
                              f"{block.stride}")
    for i, stage in enumerate(config.model.stages):
        where = f"model.stages[{i}]"
        bounded(stage.blocks, 1, MAX_BLOCKS, f"{where}.blocks")
        bounded(stage.filters, 1, MAX_FILTERS, f"{where}.filters")
        choice(stage.stride, (1, 2), f"{where}.stride")
        if stage.kernel_size % 2 == 0:
            raise ConfigError(f"{where}.kernel_size: expected an odd int (blocks pad to keep the size), "
                              f"found {stage.kernel_size}")
        bounded(stage.kernel_size, 1, 15, f"{where}.kernel_size")
        choice(stage.activation, ACTIVATIONS, f"{where}.activation")
        fraction(stage.dropout, f"{where}.dropout")
    bounded(config.model.widen, 1, MAX_BLOCKS, "model.widen")
    choice(config.model.pooling, POOLINGS, "model.pooling")
    for i, layer in enumerate(config.model.dense):
        bounded(layer.units, 1, MAX_UNITS, f"model.dense[{i}].units")
        choice(layer.activation, ACTIVATIONS, f"model.dense[{i}].activation")
        fraction(layer.dropout, f"model.dense[{i}].dropout")
    fraction(config.model.classifier_dropout, "model.classifier_dropout")
    validate_train(config.train)
    validate_data(config.data)


def validate_train(t: TrainConfig) -> None:
    bounded(t.epochs, 1, MAX_EPOCHS, "train.epochs")
    bounded(t.batch_size, 1, MAX_BATCH, "train.batch_size")
    bounded(t.eval_batch_size, 1, MAX_BATCH, "train.eval_batch_size")
    bounded(t.val_every, 1, MAX_EPOCHS, "train.val_every", "epochs")
    if isinstance(t.lr, str):
        if t.lr != "auto":
            raise ConfigError(f"train.lr: expected a learning rate (a number > 0) or auto, found {t.lr!r}")
    else:
        real(t.lr, 0, None, "train.lr", "a learning rate", low_open=True)  # huge ones diverge, and are stopped
    real(t.momentum, 0, 1, "train.momentum", "a momentum", high_open=True)
    real(t.weight_decay, 0, 1, "train.weight_decay", "a weight decay")
    real(t.norm_bias_lr_scale, 0, 1000, "train.norm_bias_lr_scale", "a multiple of the learning rate", low_open=True)
    choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    choice(t.schedule, SCHEDULES, "train.schedule")
    fraction(t.label_smoothing, "train.label_smoothing")
    bounded(t.seed, 0, MAX_SEED, "train.seed")
    if t.threads is not None:
        bounded(t.threads, 1, MAX_THREADS, "train.threads")
    if t.sync_every is not None:
        bounded(t.sync_every, 1, 1_000_000, "train.sync_every", "steps")
    bounded(t.augment_shift, 0, MAX_KERNEL, "train.augment_shift", "pixels")
    real(t.augment_erase, 0, 1, "train.augment_erase", "a probability")
    real(t.augment_rotate, 0, 180, "train.augment_rotate", "an angle in degrees")
    real(t.augment_zoom, 0, 1, "train.augment_zoom", "a scale range (0.25: 0.8x to 1.25x)")
    real(t.augment_colour, 0, 1, "train.augment_colour", "a strength (0.5: channels shuffled in half the images)")
    real(t.ema, 0, 1, "train.ema", "a decay per step", high_open=True)
    bounded(t.tta_shift, 0, MAX_KERNEL, "train.tta_shift", "pixels")
    bounded(t.early_stopping.patience, 0, MAX_EPOCHS, "train.early_stopping.patience", "epochs")
    choice(t.early_stopping.metric, STOP_METRICS, "train.early_stopping.metric")
    real(t.early_stopping.min_delta, 0, None, "train.early_stopping.min_delta", "a smallest improvement")
    if isinstance(t.class_weights, str) and t.class_weights != "balanced":
        raise ConfigError(f"train.class_weights: expected balanced, a list of one weight per class, or null, "
                          f"found {t.class_weights!r}")
    for i, weight in enumerate(t.class_weights if isinstance(t.class_weights, list) else []):
        real(weight, 0, 1e6, f"train.class_weights[{i}]", "a class weight")
    choice(t.sampling, SAMPLINGS, "train.sampling")
    if t.precision not in PRECISIONS:
        sixteen = str(t.precision).lower() in HALF_PRECISIONS  # asked for 16 bits: bf16-mixed is the way here
        raise ConfigError(f"train.precision: expected one of {', '.join(PRECISIONS)}, found {t.precision!r}"
                          + ("; did you mean 'bf16-mixed'?" if sixteen else did_you_mean(str(t.precision), PRECISIONS)))
    bounded(t.freeze_epochs, 0, MAX_EPOCHS, "train.freeze_epochs", "epochs")
    real(t.features_lr_scale, 0, 1000, "train.features_lr_scale", "a multiple of the learning rate", low_open=True)
    if not (t.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", t.device)):
        raise ConfigError(f"train.device: expected cpu, cuda, cuda:N or auto, found {t.device!r}"
                          f"{did_you_mean(t.device, ['auto', 'cpu', 'cuda'])}")


def check_dataset_name(dataset: object, where: str = "data.dataset") -> str:
    """Every way a dataset is named (--dataset, a config or sweep file, `train(dataset=...)`) comes here: an
    empty name used to be dropped on the way, and the run trained on the default dataset instead."""
    if not isinstance(dataset, str):
        raise ConfigError(f"{where}: expected a dataset name or an image folder's path (text), found "
                          f"{type(dataset).__name__} {dataset!r}")
    if not dataset.strip():
        raise ConfigError(f"{where}: expected a dataset name or an image folder's path, found {dataset!r} "
                          "(see `cnnlab datasets list`)")
    return dataset


def validate_data(d: DataConfig) -> None:
    check_dataset_name(d.dataset)
    bounded(d.image_size, 1, MAX_IMAGE_SIZE, "data.image_size", "pixels")
    choice(d.channels, (1, 3), "data.channels")
    choice(d.resize, RESIZES, "data.resize")
    bounded(d.memory_mb, 0, MAX_MEMORY_MB, "data.memory_mb", "MB")
    if d.workers is not None:
        bounded(d.workers, 0, MAX_WORKERS, "data.workers")
    if d.val_size is not None:
        bounded(d.val_size, 0, 10**9, "data.val_size", "images")  # and below the training set's size: data/


def peak_lr(t: TrainConfig) -> float:
    """train.lr as a number: `auto` must have been replaced by the finder's suggestion before training."""
    if isinstance(t.lr, str):
        raise ConfigError("train.lr is auto: run the learning-rate finder first (cnnlab train does, "
                          "or see cnnlab lr-find)")
    return t.lr


def bounded(value: int, low: int, high: int, where: str, unit: str = "") -> None:
    """An int in [low, high], or a ConfigError naming the key and the range."""
    if not low <= value <= high:
        raise ConfigError(f"{where}: expected an int from {low:,} to {high:,}{' ' + unit if unit else ''}, "
                          f"found {value}")


def real(value: float, low: float, high: float | None, where: str, what: str, low_open: bool = False,
         high_open: bool = False) -> None:
    """A finite number from low to high (None: no upper end; ends included unless open), or a ConfigError."""
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    if not (math.isfinite(value) and above and below):
        if high is None:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{where}: expected {what}, a finite number {interval}, found {value}")


def fraction(value: float, where: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}: expected a fraction in [0, 1), found {value}")


def choice(value: Any, options: tuple, where: str) -> None:
    if value not in options:
        shown = ", ".join("null" if o is None else str(o) for o in options)
        raise ConfigError(f"{where}: expected one of {shown}, found {value!r}"
                          f"{did_you_mean(str(value), [o for o in options if o])}")
