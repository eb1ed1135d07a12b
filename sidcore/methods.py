"""The distillation methods and how α is written: the one definition the library, the workflow and the
reports import."""
from __future__ import annotations

METHODS = ("sid", "sida", "sid2a")  # in the papers' order
METHOD_NAMES = {"teacher": "Teacher", "sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
ADVERSARIAL = {"sid": False, "sida": True, "sid2a": True}  # SiDA and SiD²A add the discriminator loss


def alpha_text(alpha: float | str | None) -> str:
    """α as config keys, paths, job names and tables write it: ``1.0``, ``1.2``, ``0.25``; empty without α."""
    return "" if alpha is None else str(float(alpha))


def model_label(name: str, alpha: float | None) -> str:
    """``SiD²A, α = 1.2`` from a model name and its α (the name alone without α)."""
    return name if alpha is None else f"{name}, α = {alpha_text(alpha)}"


def method_label(method: str, alpha: float | None) -> str:
    """The label of one of our models, e.g. ``SiD²A, α = 1.2`` or ``Teacher``."""
    return model_label(METHOD_NAMES.get(method, method), alpha)
