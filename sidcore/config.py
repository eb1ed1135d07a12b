"""config.yaml: read strictly, validated against its schema, with each error a sentence naming the key.

The workflow validates the merged configuration it was given (``validate``); tests and tools read a file
the same way (``load``) and resolve a job's settings from it with ``sidcore.settings``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidcore import strict_yaml
from sidcore.errors import UserError, debugging, message

SCHEMA = Path("workflow/schemas/config.schema.yaml")


def key_path(parts: Any) -> str:
    """``datasets.tiny.distill.lr`` from a JSON path's parts (list indices in brackets)."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def validate(config: dict, schema: str | os.PathLike = SCHEMA) -> None:
    """Raise a ``UserError`` naming the key of the most relevant schema violation of ``config``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(strict_yaml.load(schema))
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise UserError(f"{key_path(error.absolute_path)}: {error.message} (schema: {schema})")


def read(path: str | os.PathLike) -> dict:
    """A config file or overlay, strictly parsed (``strict_yaml``): a mapping of plain values.

    A YTE template (a top-level ``__use_yte__``) is refused: its ``?``-expressions are Python that Snakemake
    would evaluate while it only plans."""
    config = strict_yaml.load(path)
    if not isinstance(config, dict):
        kind = "empty" if config is None else f"a {type(config).__name__}"
        raise UserError(f"{path}: a configuration is a mapping of keys (as config.yaml), this one is {kind}")
    if "__use_yte__" in config:
        raise UserError(f"{path}: __use_yte__ makes it a YTE template whose ?-expressions run as Python; "
                        "configurations here are plain values: remove the key and write the values out")
    return config


def load(path: str | os.PathLike, schema: str | os.PathLike = SCHEMA) -> dict:
    """A config file, strictly parsed and validated."""
    config = read(path)
    validate(config, schema)
    return config


@contextlib.contextmanager
def exit_on_user_error(what: str) -> Iterator[None]:
    """Turn a ``UserError`` into one line on stderr and exit status 1 (``SIDCORE_DEBUG=1``: the traceback)."""
    try:
        yield
    except UserError as e:
        if debugging():
            raise
        sys.exit(f"{what}: {message(e)}")
