"""The ``sidcore`` command: one subcommand per pipeline stage.

Each command module exposes ``register(subparsers)``, which adds its subparsers and sets ``func``
to the function that runs a command. Only the module of the command being run is imported, so a
job pays for the libraries it uses and no more.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "prepare-data": "sidcore.commands",
    "train-teacher": "sidcore.commands",
    "convert-network": "sidcore.persistence",
    "distill": "sidcore.commands",
    "ddp-check": "sidcore.commands",
    "evaluate": "sidcore.commands",
    "summarize": "sidcore.summary",
    "download": "sidcore.download",
    "train-detector": "sidcore.detectors.digits",
    "ref-stats": "sidcore.metrics",
    "tabulate": "sidcore.report.tabulate",
    "plot": "sidcore.report.plot",
    "ablation": "sidcore.report.ablation",
    "cost": "sidcore.report.cost",
    "figure": "sidcore.report.figure",
    "claims": "sidcore.report.claims",
    "benchmark": "sidcore.benchmark",
    "launch": "sidcore.launch",
}


# Only `download` may use the network; every other command reads local files. These switches keep the
# libraries that could fetch on their own (Hugging Face hub / diffusers, torch.hub) offline.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself: take over the stop signals the launcher may have blocked
        from sidcore import stopping
        stopping.watch(resumable=sys.argv[1:2] in (["distill"], ["evaluate"]))
        try:
            return _run(sys.argv[1:])
        finally:  # Python's teardown restores default actions (not SIG_IGN): a late stop signal must not kill the exit
            stopping.ignore()
    return _run(argv)


def _run(argv: list[str]) -> int:
    if not argv or argv[0] != "download":
        os.environ.update(OFFLINE_ENV)
    parser = argparse.ArgumentParser(prog="sidcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [COMMANDS[argv[0]]] if argv and argv[0] in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in wanted:
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
