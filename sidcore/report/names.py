"""How tables and plots name methods, α values, models and tables."""
from __future__ import annotations

METHOD_NAMES = {"teacher": "Teacher", "sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
DISTILLATION_METHODS = ("sid", "sida", "sid2a")
TABLE_TITLES = {
    "tiny": "8×8 digits (CPU demo)",
    "tiny-claims": "8×8 digits, the papers' claims in miniature (CPU)",
    "cifar10-uncond": "CIFAR-10 32×32, unconditional",
    "cifar10-cond": "CIFAR-10 32×32, class-conditional",
    "imagenet64": "ImageNet 64×64, class-conditional",
    "ffhq64": "FFHQ 64×64, unconditional",
    "afhq64-v2": "AFHQv2 64×64, unconditional",
    "edm2": "ImageNet 512×512, EDM2 teachers: FID",
    "edm2_fd_dinov2": "ImageNet 512×512, EDM2 teachers: FD_DINOv2",
}


def alpha_text(alpha: float | None) -> str:
    """``1.0``, ``1.2``, ``0.25``; empty without α."""
    if alpha is None:
        return ""
    return f"{alpha:.1f}" if round(alpha, 1) == alpha else f"{alpha:g}"


def model_label(name: str, alpha: float | None) -> str:
    """``SiD²A, α = 1.2`` from a model name and its α (the name alone without α)."""
    return name if alpha is None else f"{name}, α = {alpha_text(alpha)}"


def method_label(method: str, alpha: float | None) -> str:
    """The label of one of our models, e.g. ``SiD²A, α = 1.2`` or ``Teacher``."""
    return model_label(METHOD_NAMES.get(method, method), alpha)


def table_title(table: str) -> str:
    """A table's title with its name, e.g. ``FFHQ 64×64, unconditional (ffhq64)``."""
    return f"{TABLE_TITLES[table]} ({table})" if table in TABLE_TITLES else table
