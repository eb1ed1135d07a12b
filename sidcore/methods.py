"""The distillation methods and how α is written: the one definition the library, the workflow and the
reports import."""
from __future__ import annotations

import math
import re

from sidcore.errors import UserError

METHODS = ("sid", "sida", "sid2a")  # in the papers' order
METHOD_NAMES = {"teacher": "Teacher", "sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
ADVERSARIAL = {"sid": False, "sida": True, "sid2a": True}  # SiDA and SiD²A add the discriminator loss


def alpha_text(alpha: float | str | None) -> str:
    """α as config keys, paths, job names and tables write it: ``1.0``, ``1.2``, ``0.25``; empty without α."""
    return "" if alpha is None else str(float(alpha))


def checked_run(method: str, alpha: str | float, where: str) -> tuple[str, float]:
    """A run named on a command line (``where``: the flag and its values): a known method and an α that is a
    number in [0, 10] written as digits (1.2, 0.0001), as config.yaml's schema admits it."""
    if method not in METHODS:
        raise UserError(f"{where}: method must be one of {', '.join(METHODS)}, not {method!r}")
    try:
        value = float(alpha)
    except ValueError:
        raise UserError(f"{where}: α {alpha!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value <= 10 and re.fullmatch(r"[0-9]+\.[0-9]+", alpha_text(value))):
        raise UserError(f"{where}: α {alpha!r} is not in [0, 10] or not writable as digits (1.2, 0.0001)")
    return method, value


def model_label(name: str, alpha: float | None) -> str:
    """``SiD²A, α = 1.2`` from a model name and its α (the name alone without α)."""
    return name if alpha is None else f"{name}, α = {alpha_text(alpha)}"


def method_label(method: str, alpha: float | None) -> str:
    """The label of one of our models, e.g. ``SiD²A, α = 1.2`` or ``Teacher``."""
    return model_label(METHOD_NAMES.get(method, method), alpha)
