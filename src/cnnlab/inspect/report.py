"""`cnnlab report`: one self-contained HTML page about a run, readable offline from disk.

Every picture is embedded as a base64 `data:` URI and the style sheet is inline: the page loads
nothing from anywhere (no server, no CDN, no web fonts), so it can be mailed or archived as is.
"""
from __future__ import annotations

import html
import io
import shlex
from collections.abc import Callable, Collection
from datetime import datetime
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from cnnlab.files import write_text
from cnnlab.images import png_data_url
from cnnlab.inspect.embedding import EmbeddingError
from cnnlab.inspect.figures import Mistake, plot_confusion
from cnnlab.inspect.run_table import format_cell, run_row
from cnnlab.inspect.show import (
    InputImage,
    LoadedRun,
    choose_input,
    show_calibration,
    show_curves,
    show_embedding,
    show_features,
    show_kernels,
    show_mistakes,
    show_saliency,
)
from cnnlab.runs import layout, records

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>cnnlab report: $name</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .7em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
nav a { margin-right: 1em; } .note { color: #555; }
</style></head>
<body>
<h1>cnnlab report: $name</h1>
<p class="note">$generated</p>
<nav>$nav</nav>
$sections
</body></html>
""")

SAMPLE_IMAGES = 3  # test images whose feature maps and saliency the report shows
MAP_IMAGES = 1000  # test images on the feature map (t-SNE of 1,000: a few seconds)


def png_data_uri(draw: Callable[[io.BytesIO], object]) -> str:
    """Run a plot function into memory and return the PNG as a data: URI."""
    buffer = io.BytesIO()
    draw(buffer)
    return png_data_url(buffer.getvalue())


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def table(header: list[str] | None, rows: list[list[Any]], numeric: Collection[int] = frozenset()) -> str:
    """An HTML table; cells are escaped here, columns in `numeric` are right-aligned; no header row for None."""
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{html.escape(str(c))}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


# ---------------------------------------------------------------------------------- sections
def summary_section(run: Path) -> str:
    row = run_row(run)
    manifest = records.read_record(run, "manifest") or {}
    facts = [("dataset", row["dataset"]), ("model preset", row["model"]), ("parameters", format_cell(row["params"])),
             ("epochs", f"{row['epochs']} of {row['epochs_planned']}"),
             ("validation accuracy (last epoch)", format_cell(row["val_accuracy"], "val_accuracy")),
             ("test accuracy", format_cell(row["test_accuracy"], "test_accuracy")),
             ("test loss", "-" if row["test_loss"] is None else f"{row['test_loss']:.4f}"),
             ("training time (s)", format_cell(row["seconds"], "seconds")), ("started", format_cell(row["started"])),
             ("versions", f"cnnlab {manifest.get('cnnlab', '?')}, torch {manifest.get('torch', '?')}"),
             ("command", shlex.join(map(str, manifest.get("command", []))) or "-"), ("run directory", str(run))]
    return table(None, [list(f) for f in facts])  # name: value rows; a header row would be an empty grey bar


def results_section(loaded: LoadedRun) -> str:
    result = loaded.test_evaluation
    confusion = img(png_data_uri(lambda out: plot_confusion(
        result.confusion, loaded.classes, out, title=f"test confusion matrix (accuracy {result.accuracy:.2%})")),
        "confusion matrix")
    per_class = table(["class", "precision", "recall", "F1", "images"],
                      [[r["class_name"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                        r["support"]] for r in result.per_class], numeric={1, 2, 3, 4})
    pairs = result.most_confused()
    confused = table(["true class", "taken for", "times"], [[p["true"], p["predicted"], p["count"]] for p in pairs],
                     numeric={2}) if pairs else "<p>No test image was misclassified.</p>"
    calibration = img(png_data_uri(lambda out: show_calibration(loaded, out)), "reliability diagram")
    cal = result.known_calibration()
    honest = (f"<p>Are the probabilities honest? Of the images the model gives 80% confidence, 80% should be "
              f"right. Expected calibration error (ECE) {cal.ece:.4f} over {cal.bins} confidence bins "
              f"(0 is honest); the model is {html.escape(cal.verdict)}.</p>{calibration}")
    return (f"<p>Rows are the true classes, columns what the model said; colours are the fraction of each "
            f"row.</p>{confusion}<h3>Per class</h3>{per_class}<h3>Most confused pairs</h3>{confused}"
            f"<h3>Calibration</h3>{honest}")


def sample_inputs(loaded: LoadedRun, count: int = SAMPLE_IMAGES) -> list[InputImage]:
    """The first test image of each of the first `count` classes present, so the samples differ."""
    labels = loaded.test_labels
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)[:count]]
    return [choose_input(loaded, index=i) for i in firsts]


def learned_section(loaded: LoadedRun) -> str:
    if not loaded.model.conv_layers():
        return "<p>This model has no conv layers: no kernels or feature maps to show.</p>"
    kernels = img(png_data_uri(lambda out: show_kernels(loaded, out, "conv1")), "conv1 kernels")
    about = ("Each panel is one kernel of the whitening layer: a direction the images' patches vary in, fitted "
             "to the data rather than learned, largest variance first, each followed by its negative (each panel "
             "on its own scale)" if "conv1" in loaded.model.whitening_layers() else
             "Each panel is one 3x3 (or larger) filter the first conv layer learned")
    parts = [f"<h3>First-layer kernels</h3><p>{about}; red weights add brightness, blue ones subtract it.</p>"
             f"{kernels}",
             "<h3>Feature maps and saliency of a few test images</h3><p>What every conv layer computes for the "
             "image (bright = strong response), then which pixels the prediction rests on.</p>"]
    for picture in sample_inputs(loaded):
        parts.append(img(png_data_uri(partial(show_features, loaded, picture=picture, max_maps=16)),
                         f"feature maps of {picture.source}"))
        parts.append(img(png_data_uri(partial(show_saliency, loaded, picture=picture)),
                         f"saliency of {picture.source}"))
    parts.append(map_section(loaded))
    return "".join(parts)


def map_section(loaded: LoadedRun) -> str:
    """The feature map by PCA, and by t-SNE when scikit-learn is installed (said so when it is not)."""
    parts = ["<h3>A map of the learned features</h3><p>Test images placed by the numbers the classifier reads "
             "(the penultimate layer): images of a class the network tells apart sit together.</p>"]
    methods = ["pca"]
    if find_spec("sklearn") is not None:
        methods.append("tsne")
    else:
        parts.append('<p class="note">(t-SNE, which keeps neighbours together, needs scikit-learn: '
                     "pip install scikit-learn, then make the report again.)</p>")
    for method in methods:
        buffer = io.BytesIO()
        try:
            described = show_embedding(loaded, buffer, method, MAP_IMAGES).describe()
        except EmbeddingError as exc:  # too few test images for a map: the rest of the report still stands
            parts.append(f'<p class="note">(No map: {html.escape(str(exc))}.)</p>')
            break
        uri = png_data_url(buffer.getvalue())
        parts.append(f"<p>{html.escape(described)}.</p>{img(uri, f'{method} map of the test images')}")
    return "".join(parts)


def mistakes_section(loaded: LoadedRun, limit: int = 18) -> str:
    """The most confident mistakes as pictures, then as a table naming each file (to open, move or relabel)."""
    drawn: list[Mistake] = []
    picture = img(png_data_uri(lambda out: drawn.extend(show_mistakes(loaded, out, limit=limit))),
                  "misclassified test images")
    rows = [[m.name, loaded.classes[m.true_label], loaded.classes[m.predicted_label], f"{m.confidence:.0%}"]
            for m in drawn]
    where = "predictions.csv in the run lists every test image" if \
        layout.path(loaded.run, "predictions").is_file() else "cnnlab predict names more files"
    listed = table(["file", "true", "predicted", "confidence"], rows, numeric={3}) if rows else ""
    return ("<p>Misclassified test images, the most confident mistakes first.</p>" + picture + listed
            + f'<p class="note">Files are relative to the dataset folder (a number is a test index); {where}.</p>')


def config_section(run: Path) -> str:
    config = layout.path(run, "config").read_text()
    summary_file = layout.path(run, "summary")
    layers = summary_file.read_text() if summary_file.is_file() else "(summary.txt missing)"
    return f"<h3>Layers</h3><pre>{html.escape(layers)}</pre><h3>config.yaml</h3><pre>{html.escape(config)}</pre>"


def build_report(run: str | Path, data_dir: str | Path | None = None) -> str:
    """The report page of a run as one HTML string."""
    run = layout.check_run(run, "config", "weights")
    loaded = LoadedRun(run, data_dir)
    history = records.read_metrics(run)
    curves = (img(png_data_uri(lambda out: show_curves(run, out)), "training curves")
              if history else "<p>No finished epoch recorded.</p>")
    mistakes = mistakes_section(loaded)
    sections = [("summary", "Summary", summary_section(run)),
                ("curves", "Training curves", "<p>Train (solid) and validation (dashed) per epoch; validation "
                 "getting worse while training improves means overfitting.</p>" + curves),
                ("results", "Test results", results_section(loaded)),
                ("mistakes", "Mistakes", mistakes),
                ("learned", "What the network learned", learned_section(loaded)),
                ("config", "Config", config_section(run))]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>\n' for key, title, content in sections)
    return PAGE.substitute(name=html.escape(loaded.name), nav=nav, sections=body,
                           generated=f"generated {datetime.now():%Y-%m-%d %H:%M} by cnnlab report; "
                                     "self-contained: opens from disk, no network needed")


def write_report(run: str | Path, out: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """Write the report page (default <run>/report.html) atomically; returns its path."""
    page = build_report(run, data_dir)
    target = Path(out) if out is not None else layout.path(run, "report")
    write_text(target, page)
    return target
