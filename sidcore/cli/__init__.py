"""The ``sidcore`` command: the command-line layer on top of the library.

One module per group of commands (``stages``: the pipeline's compute stages; ``artifacts``: downloads,
conversions, detectors and reference statistics; ``report``: summaries, tables, plots, figures, claims;
``tools``: benchmark and launcher). Each adds its subparsers in ``register`` and imports the library
only inside the function that runs a command, so a job pays for the libraries it uses and no more.

A ``UserError`` (bad config, file, flag, download) or an OS error on a file it reads or writes is printed as
one sentence naming it, without a traceback, and the command exits with status 2; ``--debug`` or
``SIDCORE_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from sidcore.cli import artifacts, console, report, stages, tools
from sidcore.errors import UserError, debugging, message

GROUPS = (stages, artifacts, report, tools)
RESUMABLE = ("distill", "evaluate")  # commands that take a stop signal as a request to save and exit
USER_ERROR_EXIT = 2

# Only `download` may use the network; every other command reads local files. These switches keep the
# libraries that could fetch on their own (Hugging Face hub / diffusers, torch.hub) offline.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def parser() -> argparse.ArgumentParser:
    """The ``sidcore`` parser with every command."""
    p = argparse.ArgumentParser(prog="sidcore", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    p.add_argument("--log", metavar="FILE", help="write the command's output to FILE and show its progress on the "
                                                 "console, one line per report (sidcore/cli/console.py)")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program itself: take over the stop signals the launcher may have blocked
        from sidcore import stopping
        stopping.watch(resumable=command_of(sys.argv[1:]) in RESUMABLE)
        try:
            return run(sys.argv[1:])
        finally:  # Python's teardown restores default actions (not SIG_IGN): a late stop signal must not kill the exit
            stopping.ignore()
    return run(argv)


def _split(argv: list[str]) -> tuple[str | None, str | None]:
    """The ``--log`` file and the command of ``argv`` (``[--debug] [--log FILE] COMMAND ...``), or None."""
    log, i = None, 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--log" and i + 1 < len(argv):
            log, i = argv[i + 1], i + 2
        else:
            log, i = (argv[i][len("--log="):] if argv[i].startswith("--log=") else log), i + 1
    return log, argv[i] if i < len(argv) else None


def command_of(argv: list[str]) -> str | None:
    """The command named in ``argv``."""
    return _split(argv)[1]


def logged_to(argv: list[str]) -> str | None:
    """The ``--log`` file given before the command, if any."""
    return _split(argv)[0]


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; a user error becomes one message on stderr and exit status 2."""
    log = logged_to(argv)
    if log is not None:  # before parsing: a refused flag is in the log too
        try:
            console.log_to(log)
        except OSError as e:
            print(f"sidcore: error: --log {log}: {message(e)}", file=sys.stderr)
            return USER_ERROR_EXIT
    args = parser().parse_args(argv)
    if args.subcommand != "download":
        os.environ.update(OFFLINE_ENV)
    try:
        return int(args.func(args) or 0)
    except (UserError, OSError) as e:  # a file that is missing, a directory, unwritable, or named too long
        if args.debug or debugging():
            raise
        print(f"sidcore {args.subcommand}: error: {message(e)}", file=sys.stderr)
        console.echo(f"error: {message(e)}")
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
