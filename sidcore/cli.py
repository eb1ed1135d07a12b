"""The ``sidcore`` command: one subcommand per pipeline stage.

Each command module exposes ``register(subparsers)``, which adds its subparser and sets
``func`` to the function that runs it with the parsed arguments.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "sidcore.commands",
    "sidcore.download",
    "sidcore.detectors.digits",
    "sidcore.metrics",
    "sidcore.report.tabulate",
    "sidcore.report.plot",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
