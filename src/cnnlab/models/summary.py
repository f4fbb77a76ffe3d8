"""`model.summary()` for a layer plan: a text table in the style of Keras, with optional formulas.

Rows are the plan's layers in the lesson's order (conv -> relu -> pool, as the explorer and `show
features` show them too; the network may run the pool first, which `--explain` notes). An activation is
shown in the title of the layer it follows ("conv1 (Conv2D 3x3, relu)"), as Keras writes it; a model
with skip connections gets Keras' "Connected to" column, naming the layers each one reads.
"""
from __future__ import annotations

import html

from cnnlab.config import Config
from cnnlab.models.plan import Activation, Add, Dense, GlobalPool, Layer, Plan, Shape, plan


def format_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def rows_of(plan: Plan) -> list[tuple[Layer, Layer | None]]:
    """(layer, the activation that follows it) in run order; activations ride on their predecessor."""
    rows: list[tuple[Layer, Layer | None]] = []
    for layer in plan.layers():
        previous = rows[-1][0] if rows else None
        if isinstance(layer.spec, Activation) and previous is not None and rows[-1][1] is None \
                and layer.inputs == (previous.name,):
            rows[-1] = (previous, layer)
        else:
            rows.append((layer, None))
    return rows


class Summary(str):
    """The layer table as text (print it, write it), shown as an HTML table in a notebook."""

    rows: list[list[str]]  # the header, then one row per layer
    notes: list[str]  # the totals, and with `explain` where the parameters are
    model_name: str

    def __new__(cls, text: str, rows: list[list[str]], notes: list[str], title: str = "") -> Summary:
        summary = super().__new__(cls, text)
        summary.rows, summary.notes, summary.model_name = rows, notes, title
        return summary

    def _repr_html_(self) -> str:
        numeric = {2}  # Param #
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.rows[0])
        body = "".join("<tr>" + "".join(f'<td style="text-align:{"right" if i in numeric else "left"}">'
                                        f"{html.escape(cell)}</td>" for i, cell in enumerate(row)) + "</tr>"
                       for row in self.rows[1:])
        caption = f"<caption>Model: {html.escape(self.model_name)}</caption>" if self.model_name else ""
        notes = "".join(f"<p>{html.escape(line)}</p>" for line in self.notes if line)
        return f"<table>{caption}<tr>{head}</tr>{body}</table>{notes}"

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:  # IPython in a terminal: the table, not repr()
        printer.text(str(self))  # type: ignore[attr-defined]


def format_summary(plan: Plan, title: str = "", explain: bool = False) -> Summary:
    """The layer table: name (type), output shape, parameters, [connected to], and with `explain` each formula."""
    connected = plan.residual
    header = ["Layer (type)", "Output shape", "Param #"] + (["Connected to"] if connected else [])
    rows = [header + (["How"] if explain else [])]
    rows.append(["input", format_shape(plan.input_shape), "0"] + ([""] if connected else [])
                + (["the image, channels-last"] if explain else []))
    shown = rows_of(plan)
    row_name = {activation.name: layer.name for layer, activation in shown if activation is not None}
    classifier = plan.head[-1]
    for layer, activation in shown:
        kind = layer.title + (f", {activation.title}" if activation else "")
        if layer is classifier:
            kind += ", softmax"  # the network outputs logits; the loss and predict_proba apply the softmax
        row = [f"{layer.name} ({kind})", format_shape(layer.output_shape), f"{layer.params:,}"]
        if connected:
            row.append(", ".join(row_name.get(name, name) for name in layer.inputs))
        if explain:
            extra = activation.formula if activation and activation.formula != "no parameters" else ""
            how = layer.formula + (f"; {extra}" if extra else "")
            row.append(how)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "─" * (sum(widths) + 3 * (len(widths) - 1))

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), *(
            cell.ljust(width) for cell, width in zip(row[3:], widths[3:]))]
        return "   ".join(cells).rstrip()

    total = plan.params
    frozen = plan.frozen_params
    notes = [f"Total params: {total:,}", f"Trainable params: {total - frozen:,}",
             *([f"Non-trainable params: {frozen:,} (whitening kernels, fitted to the data)"] if frozen else []),
             f"Multiply-adds per image: {plan.macs:,}"]
    if explain:
        notes += ["", *explain_totals(plan)]
    out = [f'Model: "{title}"'] if title else []
    out += [line, fmt(rows[0]), "═" * len(line)] + [fmt(r) for r in rows[1:]] + [line] + notes
    return Summary("\n".join(out), rows, notes, title)


def explain_totals(plan: Plan) -> list[str]:
    """Where the parameters are, in words, and what the residual adds and global pooling do."""
    layers = plan.layers()
    total = plan.params
    biggest = max(layers, key=lambda layer: layer.params)
    share = biggest.params / total if total else 0.0
    lines = [f"{biggest.name} holds {biggest.params:,} of the {total:,} parameters ({share:.1%}).",
             "Pooling, dropout, flatten, adds and activations have no parameters: they only reshape, select, "
             "combine or zero values."]
    flatten = next((layer for layer in layers if layer.name == "flatten"), None)
    if flatten is not None and isinstance(biggest.spec, Dense) and plan.conv_layers():
        lines.append(f"Every one of the {flatten.output_shape[0]:,} values coming out of Flatten connects to "
                     f"every unit of {biggest.name}; fewer or smaller feature maps before Flatten (more pooling, "
                     "strides, or global pooling) shrink it, and dropout fights the overfitting so many parameters "
                     "invite.")
    if plan.residual:
        adds = [layer for layer in layers if isinstance(layer.spec, Add)]
        lines.append(f"{len(adds)} residual blocks each add their input back to what their two convs computed "
                     "(the skip connection): the block only has to learn a correction, and the gradient reaches "
                     "early layers through the adds undiminished, which is what lets deep networks train.")
    pool = next((layer for layer in layers if isinstance(layer.spec, GlobalPool)), None)
    if pool is not None:
        h, w, c = plan.feature_shape
        lines.append(f"{pool.name} reduces each of the {c} final {h}x{w} feature maps to one number, so the "
                     f"classifier sees {c} values whatever the image size, and has {c + 1} weights per class "
                     f"instead of {h * w * c + 1}.")
    return lines


def summarize(config: Config, input_shape: Shape = (28, 28, 1), num_classes: int = 10, explain: bool = False
              ) -> Summary:
    """The layer table of a config, without building or training anything."""
    return format_summary(plan(config.model, input_shape, num_classes), config.model.name, explain)
