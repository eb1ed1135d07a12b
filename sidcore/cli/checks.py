"""The checks every command's flags share, as argparse types: a bad value is refused by the parser, naming
the flag, before any work (numbers a command can use, output files of the format the flag writes)."""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

SUFFIXES = {"CSV": ".csv", "Markdown": ".md", "PNG": ".png", "PDF": ".pdf", "JSON": ".json", "NPZ": ".npz",
            "zip": ".zip", "checkpoint": ".pt"}
SEED_LIMIT = 2 ** 31  # seeds as config.yaml allows them (its schema: $defs/seed)
NAME_MAX = 255  # bytes of a file name on the file systems jobs write to
GRID_MAX = 64  # rows or columns of a sample grid (config.yaml `figures`, whose schema says the same)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {'∞' if high is None else high}]")
        return value
    return parse


def positive_number(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def output(kind: str) -> Callable[[str], Path]:
    """A file of ``kind`` to write (``SUFFIXES``): its name must end as that format's does."""
    suffix = SUFFIXES[kind]

    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() != suffix:
            raise argparse.ArgumentTypeError(f"{text!r}: a {kind} file's name ends in {suffix}")
        if len(path.name.encode()) > NAME_MAX:
            raise argparse.ArgumentTypeError(f"{path.name[:40]!r}…: a file name of more than {NAME_MAX} bytes")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a directory; name the {kind} file to write")
        return path
    return parse


def plan_id(text: str) -> str:
    """An id of a plan: 1 to 64 letters, digits and ``. _ -``."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text[:70]!r} is not 1 to 64 letters, digits and . _ -")
    return text


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
SEED = integer(0, SEED_LIMIT - 1)
