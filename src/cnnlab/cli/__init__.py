"""Command line: thin commands that parse options and call the library."""
from cnnlab.cli._app import app
from cnnlab.cli import playground  # noqa: F401  (registers convolve, pool, explain)


def main() -> None:
    app()
