"""`model.summary()` for a layer plan: a text table in the style of Keras, with optional formulas."""
from __future__ import annotations

from cnnlab.models.plan import Layer, Shape, count_macs, count_params


def format_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def format_summary(layers: list[Layer], input_shape: Shape, title: str = "", explain: bool = False) -> str:
    """The layer table: name (type), output shape, parameters, and with `explain` each formula."""
    rows = [("Layer (type)", "Output shape", "Param #") + (("How",) if explain else ())]
    rows.append(("input", format_shape(input_shape), "0") + (("the image, channels-last",) if explain else ()))
    for layer in layers:
        row = (f"{layer.name} ({layer.title})", format_shape(layer.output_shape), f"{layer.params:,}")
        rows.append(row + ((layer.formula,) if explain else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "─" * (sum(widths) + 3 * (len(widths) - 1))

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2])]
        if explain:
            cells.append(row[3])
        return "   ".join(cells).rstrip()

    total, macs = count_params(layers), count_macs(layers)
    out = [f'Model: "{title}"'] if title else []
    out += [line, fmt(rows[0]), "═" * len(line)] + [fmt(r) for r in rows[1:]] + [line]
    out += [f"Total params: {total:,}", f"Trainable params: {total:,}",
            f"Multiply-adds per image: {macs:,}"]
    if explain:
        out += ["", *explain_totals(layers, total)]
    return "\n".join(out)


def explain_totals(layers: list[Layer], total: int) -> list[str]:
    """Where the parameters are, in words: usually the first dense layer after Flatten."""
    biggest = max(layers, key=lambda layer: layer.params)
    share = biggest.params / total if total else 0.0
    lines = [f"{biggest.name} holds {biggest.params:,} of the {total:,} parameters ({share:.1%}).",
             "Pooling, dropout, flatten and activations have no parameters: they only reshape, select or "
             "zero values."]
    flatten = next(layer for layer in layers if layer.kind == "flatten")
    if biggest.kind == "dense" and any(layer.kind == "conv" for layer in layers):
        lines.append(f"Every one of the {flatten.output_shape[0]:,} values coming out of Flatten connects to "
                     f"every unit of {biggest.name}; fewer or smaller feature maps before Flatten (more pooling, "
                     "strides) shrink it, and dropout fights the overfitting so many parameters invite.")
    return lines
