"""Command line: thin commands that parse options and call the library."""
from cnnlab.cli._app import app
from cnnlab.cli import datasets, inspect, playground, sweep, training, use  # noqa: F401  (each registers its commands)


def main() -> None:
    app()
