"""Command line: thin commands that parse options and call the library.

Each module registers its commands on the one app, grouped into help panels by what a user is doing
(learn, train, look inside, use, scale out); the import order below is the order `cnnlab --help`
lists them in. Command modules import the library inside each command, so `cnnlab --help` loads no torch.
"""
from cnnlab.cli import datasets, inspect, playground, sweep, training, use  # noqa: F401  (each registers its commands)
from cnnlab.cli._app import app


def main() -> None:
    app()
