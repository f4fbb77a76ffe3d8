"""A map of what the network learned: the test images placed by the features the classifier reads.

The penultimate layer (the input of the last dense layer, the one that scores the classes) holds one
vector per image; the classifier is linear in it, so images of a class the network tells apart sit
together there. PCA (NumPy's SVD: the two directions of largest variance) or t-SNE (scikit-learn's,
when installed: keeps neighbours together, distances between clusters mean little) flattens it to 2-D,
and the map draws each image as a point in its true class's colour with thumbnails of some of them,
like TensorBoard's projector. `neighbour_agreement` puts a number on the picture.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnlab.data.pixels import to_inputs, to_pixels
from cnnlab.errors import UserError
from cnnlab.inspect.figures import Output, new_figure, save_figure

METHODS = ("pca", "tsne")
MAX_IMAGES = 5000  # t-SNE on 5,000 points takes ~30 s on two cores; the neighbour count is O(N^2) in chunks


class EmbeddingError(UserError, ValueError):
    """A map that cannot be drawn as asked (t-SNE without scikit-learn, too few images)."""


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The last dense layer of the model: the one whose outputs are the class scores."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EmbeddingError("the model has no dense layer, so no penultimate features to map")
    return linears[-1]


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The classifier's input (N, D) for uint8 images (N, C, H, W), in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = classifier_layer(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].detach().flatten(1).cpu()))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            model(to_inputs(images[start:start + batch_size], False, device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).double().numpy()


def pca(features: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Features (N, D) projected on their two principal directions (N, 2), and the share of the variance
    each direction holds."""
    centred = features - features.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    total = float(variance.sum()) or 1.0
    coords = centred @ directions[:2].T
    if coords.shape[1] < 2:  # one feature: a line, drawn along x
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
    return coords, [float(v / total) for v in variance[:2]]


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE of features (N, D) to (N, 2), seeded, started from the PCA (reproducible)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise EmbeddingError("t-SNE needs scikit-learn: pip install scikit-learn (or use --method pca, which "
                             "needs nothing more)") from None
    perplexity = min(30.0, (len(features) - 1) / 3)  # scikit-learn requires perplexity < N
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def neighbour_agreement(coords: np.ndarray, labels: np.ndarray, chunk: int = 1024) -> float:
    """The fraction of points whose nearest other point on the map has the same class (1.0: classes
    perfectly apart; about 1/classes: mixed at random)."""
    nearest = np.empty(len(coords), dtype=np.int64)
    squared = (coords ** 2).sum(axis=1)
    for start in range(0, len(coords), chunk):
        block = coords[start:start + chunk]
        distances = squared[start:start + chunk, None] - 2 * block @ coords.T + squared[None, :]
        distances[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf  # not itself
        nearest[start:start + len(block)] = distances.argmin(axis=1)
    return float((labels[nearest] == labels).mean())


@dataclass
class Embedding:
    """The 2-D map of `count` test images: coordinates (N, 2), their true and predicted classes, how it was made."""

    coords: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    method: str
    dimensions: int  # length of the penultimate feature vector
    explained: list[float]  # PCA: the variance share of each axis; t-SNE: empty
    agreement: float  # neighbour_agreement of the map

    @property
    def count(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        how = (f"PCA of the {self.dimensions}-number penultimate features (axes hold "
               f"{self.explained[0]:.0%} and {self.explained[1]:.0%} of their variance)" if self.method == "pca"
               else f"t-SNE of the {self.dimensions}-number penultimate features")
        return (f"{how}; {self.count} test images, {self.agreement:.0%} have a nearest neighbour on the map "
                "of their own class")


def embed(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, method: str = "pca", seed: int = 0,
          batch_size: int = 256) -> Embedding:
    """The map of uint8 images (N, C, H, W) with labels (N,) by `method` ("pca" or "tsne")."""
    if method not in METHODS:
        raise EmbeddingError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if len(images) < 3:
        raise EmbeddingError(f"a map needs at least 3 images, got {len(images)}")
    features = penultimate(model, images, batch_size)
    predictions = classifier_layer(model)(torch.from_numpy(features).to(classifier_layer(model).weight)
                                          ).argmax(1).cpu().numpy()
    if method == "pca":
        coords, explained = pca(features)
    else:
        coords, explained = tsne(features, seed), []
    label_array = labels.numpy()
    return Embedding(coords, label_array, predictions, method, features.shape[1], explained,
                     neighbour_agreement(coords, label_array))


def spread_out(coords: np.ndarray, count: int) -> list[int]:
    """Up to `count` point indices far apart on the map (farthest-point order from the first), so
    thumbnails do not cover each other."""
    span = np.ptp(coords, axis=0).max() or 1.0
    chosen = [0]
    distance = np.linalg.norm(coords - coords[0], axis=1)
    while len(chosen) < min(count, len(coords)):
        far = int(distance.argmax())
        if distance[far] < span / 25:  # the rest sit on top of ones already shown
            break
        chosen.append(far)
        distance = np.minimum(distance, np.linalg.norm(coords - coords[far], axis=1))
    return chosen


def plot_embedding(emb: Embedding, images: torch.Tensor, classes: tuple[str, ...], out: Output,
                   thumbnails: int = 60, title: str = "") -> Output:
    """The map as a PNG: points coloured by true class (crosses: the model got it wrong), thumbnails of
    `thumbnails` images spread over it framed in their class's colour, a legend of class names."""
    from matplotlib import colormaps
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig = new_figure(10, 8.5)
    ax = fig.add_subplot()
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colour = {c: palette(c % palette.N) for c in range(len(classes))}
    right = emb.predictions == emb.labels
    for c, name in enumerate(classes):
        mine = emb.labels == c
        if mine.any():
            hit, miss = emb.coords[mine & right], emb.coords[mine & ~right]
            ax.scatter(hit[:, 0], hit[:, 1], s=10, color=colour[c], alpha=0.7, label=name)
            if len(miss):
                ax.scatter(miss[:, 0], miss[:, 1], s=28, color=colour[c], marker="x", lw=1.2)
    for i in spread_out(emb.coords, thumbnails):
        pixels = to_pixels(images[i])
        box = OffsetImage(pixels, zoom=0.9 if pixels.shape[0] <= 32 else 28 / pixels.shape[0],
                          cmap="gray" if pixels.ndim == 2 else None)
        ax.add_artist(AnnotationBbox(box, tuple(emb.coords[i]), pad=0.1, frameon=True,
                                     bboxprops={"edgecolor": colour[int(emb.labels[i])], "lw": 1.5}))
    wrong = int((~right).sum())
    caption = "\n".join(textwrap.wrap(f"{emb.describe()}. Crosses: the {wrong} images the model got wrong.", 120))
    if emb.method == "pca":
        ax.set_xlabel(f"first principal direction ({emb.explained[0]:.0%} of the variance)\n\n{caption}")
        ax.set_ylabel(f"second principal direction ({emb.explained[1]:.0%})")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"t-SNE: neighbours stay together; distances between clusters mean little\n\n{caption}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, markerscale=2, title="true class",
              frameon=False)
    ax.set_title(title or f"{emb.method} map", fontsize=11)
    return save_figure(fig, out)
