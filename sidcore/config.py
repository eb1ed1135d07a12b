"""config.yaml: read strictly, validated against its schema, with each error a sentence naming the key.

The workflow validates the merged configuration it was given (``validate``); tests and tools read a file
the same way (``load``) and resolve a job's settings from it with ``sidcore.settings``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidcore import strict_yaml
from sidcore.errors import UserError, debugging, message
from sidcore.methods import METHODS

SCHEMA = Path("workflow/schemas/config.schema.yaml")
SCHEMA_ID = "urn:sidcore:config-schema"
# Where each block of a job's resolved settings is described in the schema (the others: datasets.<d>.<key>).
SETTINGS_BLOCKS = {"distill": "#/$defs/full_distill", "evaluation": "#/properties/evaluation",
                   "alpha": "#/$defs/alpha", "init": "#/$defs/sid2a_method/properties/init"}
NOT_SETTINGS = ("methods", "cluster", "released", "ablation")  # dataset keys the workflow alone reads


def key_path(parts: Any) -> str:
    """``datasets.tiny.distill.lr`` from a JSON path's parts (list indices in brackets)."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


@functools.cache
def _validator_class() -> Any:
    """Draft 2020-12 whose integers are integers (64.0 is not: a job would get a float)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)


def validator(schema: dict, **kwargs: Any) -> Any:
    """A JSON-schema validator of ``schema`` (``_validator_class``)."""
    return _validator_class()(schema, **kwargs)


def violation(check: Any, value: Any, at: tuple[str, ...] = ()) -> str | None:
    """``key: problem`` of the most relevant violation of ``value`` (found at key path ``at``); a rule written
    as a combination of schemas is stated by its description."""
    import jsonschema

    error = jsonschema.exceptions.best_match(check.iter_errors(value))
    if error is None:
        return None
    path = [*at, *error.absolute_path]
    problem = error.message
    if error.validator in ("not", "anyOf", "oneOf") and "description" in error.schema:
        problem = f"{error.instance!r} is not allowed: {error.schema['description']}"
    elif error.validator in ("additionalProperties", "unevaluatedProperties"):
        return unknown_key(error, path)
    elif error.validator == "type" and isinstance(error.instance, str) and _is_number(error.instance):
        spelled = re.sub(r"^([+-]?[0-9]+)([eE])", r"\1.0\2", error.instance)
        problem += f": YAML reads {error.instance} as text (a number needs a dot before its exponent); write {spelled}"
    return f"{key_path(path)}: {problem}"


def unknown_key(error: Any, path: list) -> str:
    """An unexpected key, named with where it is, the known keys and the nearest of them."""
    import difflib

    known = sorted(error.schema.get("properties", {}))
    patterns = list(error.schema.get("patternProperties", {}))
    extra = [k for k in error.instance if k not in known and not any(re.search(p, str(k)) for p in patterns)]
    key = extra[0] if extra else "?"
    where = f"in {key_path(path)}" if path else "at the top level"
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown key {key!r} {where} (known: {', '.join(known)}){hint}"


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def validate(config: dict, schema: str | os.PathLike = SCHEMA) -> None:
    """Raise a ``UserError`` naming the key of the most relevant schema violation of ``config``."""
    problem = violation(validator(strict_yaml.load(_schema_path(schema))), config)
    if problem is not None:
        raise UserError(f"{problem} (schema: {schema})")


def non_finite(value: Any, key: str = "") -> Iterator[str]:
    """Key paths of the NaN / ±inf numbers in a nested config."""
    if isinstance(value, float) and not math.isfinite(value):
        yield key
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from non_finite(v, f"{key}[{i}]")


def check_settings(settings: dict, flag: str = "--settings", schema: str | os.PathLike = SCHEMA) -> None:
    """A job's resolved settings (``sidcore.settings``) held to the bounds config.yaml's schema gives each of
    their blocks, and to finite numbers: a ``UserError`` naming ``flag`` and the key."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    bad = list(non_finite(settings))
    if bad:
        raise UserError(f"{flag}: {bad[0]}: NaN or infinity is not a usable value")
    root = strict_yaml.load(_schema_path(schema))
    registry = Registry().with_resource(SCHEMA_ID, Resource.from_contents(root, default_specification=DRAFT202012))
    dataset = root["$defs"]["dataset"]["properties"]
    where = {k: f"#/$defs/dataset/properties/{k}" for k in dataset if k not in NOT_SETTINGS} | SETTINGS_BLOCKS
    for key, value in settings.items():
        if key == "method" and value not in METHODS:
            raise UserError(f"{flag}: method: {value!r} is not one of {', '.join(METHODS)}")
        if key in where and value is not None:  # None: a block this run has not (init, size)
            problem = violation(validator({"$ref": SCHEMA_ID + where[key]}, registry=registry), value, (key,))
            if problem is not None:
                raise UserError(f"{flag}: {problem}")


def _schema_path(schema: str | os.PathLike) -> Path:
    """``schema``, relative to the working directory or else to the checkout sidcore is installed from."""
    path = Path(schema)
    return path if path.exists() or path.is_absolute() else Path(__file__).resolve().parents[1] / path


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
