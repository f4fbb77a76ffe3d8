"""The one Typer application every command module registers on, and the panels `cnnlab --help` shows."""
import typer

# Help groups commands by what a user is doing, in this order.
LEARN = "Learn: what a convolution and a CNN are"
TRAIN = "Train"
LOOK = "Look inside a trained run"
USE = "Use a trained run"
SCALE = "Scale out"
PANELS = [LEARN, TRAIN, LOOK, USE, SCALE]

app = typer.Typer(
    name="cnnlab",
    help="Learn, build, train, inspect and use convolutional neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # so a literal bracket in a help text is escaped: cnnlab\[wandb]
)
