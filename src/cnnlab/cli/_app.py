"""The one Typer application every command module registers on."""
import typer

app = typer.Typer(
    name="cnnlab",
    help="Learn, build, train, inspect and use convolutional neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
