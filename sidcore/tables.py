"""The report tables: each one's title, the metrics it shows and the table whose runs feed it.

A dataset names its table in config.yaml (``datasets.<d>.table``); a table not listed here shows FID
under its own name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    metrics: tuple[str, ...] = ("fid",)
    source: str | None = None  # the table whose evaluation summaries it shows (default: its own)

    @property
    def heading(self) -> str:
        """The title with the name, e.g. ``FFHQ 64×64, unconditional (ffhq64)``."""
        return self.name if self.title == self.name else f"{self.title} ({self.name})"

    @property
    def summaries_of(self) -> str:
        return self.source or self.name


TABLES = {t.name: t for t in (
    Table("tiny", "8×8 digits (CPU demo)", ("fid", "is")),
    Table("tiny-claims", "8×8 digits, the papers' claims in miniature (CPU)", ("fid", "is")),
    Table("cifar10-uncond", "CIFAR-10 32×32, unconditional", ("fid", "is")),
    Table("cifar10-cond", "CIFAR-10 32×32, class-conditional"),
    Table("imagenet64", "ImageNet 64×64, class-conditional", ("fid", "precision", "recall")),
    Table("ffhq64", "FFHQ 64×64, unconditional"),
    Table("afhq64-v2", "AFHQv2 64×64, unconditional"),
    Table("edm2", "ImageNet 512×512, EDM2 teachers: FID"),
    Table("edm2_fd_dinov2", "ImageNet 512×512, EDM2 teachers: FD_DINOv2", ("fd_dinov2",), source="edm2"),
)}


def table(name: str) -> Table:
    """The definition of table ``name`` (a table not listed: FID, titled by its name)."""
    return TABLES.get(name, Table(name, name))
