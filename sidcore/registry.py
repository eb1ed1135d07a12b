"""The registry of downloadable artifacts (``sidcore/data/artifacts.yaml``).

The YAML groups entries as ``group -> name -> {url, sha256, size, kind, note}``; an artifact's key
is ``"<group>/<name>"``, e.g. ``teacher/edm-cifar10-32x32-uncond-vp``. ``kind`` names the content
check a first download must pass before its digest is pinned (:data:`sidcore.content.KINDS`). A plain
``http(s)://`` or ``file://`` URL is accepted wherever a key is, as an artifact without registry
metadata: its kind is the one the caller names, else the one its file name's extension says
(:data:`sidcore.content.EXTENSIONS`).
"""
from __future__ import annotations

import difflib
import functools
import importlib.resources
import re
from dataclasses import dataclass

from sidcore import strict_yaml
from sidcore.content import KINDS, kind_of_name
from sidcore.errors import UserError

URL_SCHEMES = ("http://", "https://", "file://")
FIELDS = {"url", "sha256", "size", "kind", "note"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Artifact:
    """One downloadable file. ``key`` is None for a bare URL."""

    key: str | None
    url: str
    sha256: str | None = None  # published lowercase hex digest, if any
    size: int | None = None  # bytes, if known
    note: str = ""
    kind: str | None = None  # content kind (sidcore.content.KINDS); None for a bare URL

    @property
    def id(self) -> str:
        """Name under which the artifact is recorded in a lock file: its key, else its URL."""
        return self.key or self.url


def parse(text: str) -> dict[str, Artifact]:
    """Parse and validate registry YAML into ``{key: Artifact}``."""
    table = {}
    for group, entries in strict_yaml.loads(text, "sidcore/data/artifacts.yaml").items():
        for name, fields in entries.items():
            key = f"{group}/{name}"
            if not isinstance(fields, dict) or not {"url", "kind"} <= set(fields) or set(fields) - FIELDS:
                raise ValueError(f"registry entry {key}: expected fields {sorted(FIELDS)} with a url and a kind, "
                                 f"got {fields!r}")
            if fields["kind"] not in KINDS:
                raise ValueError(f"registry entry {key}: unknown kind {fields['kind']!r}; "
                                 f"use one of {', '.join(KINDS)}")
            sha256, size = fields.get("sha256"), fields.get("size")
            if sha256 is not None and not _SHA256.fullmatch(sha256):
                raise ValueError(f"registry entry {key}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
            if size is not None and (not isinstance(size, int) or size <= 0):
                raise ValueError(f"registry entry {key}: size must be a positive integer, got {size!r}")
            table[key] = Artifact(key, fields["url"], sha256, size, fields.get("note") or "", fields["kind"])
    return table


@functools.cache
def artifacts() -> dict[str, Artifact]:
    """All registry entries by key (loaded once from the packaged YAML)."""
    text = importlib.resources.files("sidcore").joinpath("data/artifacts.yaml").read_text(encoding="utf-8")
    return parse(text)


def lookup(key: str, kind: str | None = None) -> Artifact:
    """The artifact registered under ``key``, or a key-less artifact for a plain URL, whose content kind is
    ``kind`` or its extension's (None if neither says)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown content kind {kind!r}; use one of {', '.join(KINDS)}")
    if key.startswith(URL_SCHEMES):
        return Artifact(None, key, kind=kind or kind_of_name(key))
    if kind is not None:
        raise UserError(f"{key}: a registry entry has its own kind; a kind is named for a plain URL only")
    table = artifacts()
    if key not in table:
        close = difflib.get_close_matches(key, table, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UserError(f"unknown artifact key {key!r} (sidcore/data/artifacts.yaml){hint}")
    return table[key]
