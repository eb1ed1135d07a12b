"""Errors a person can act on.

A ``UserError`` is a problem with what the user gave (a config key, a file, a flag, a download): the
``sidcore`` command prints its message, naming the culprit and what to do, in a line or a few and
without a traceback (``SIDCORE_DEBUG=1`` or ``--debug`` shows it). Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input: the message names the file, key, flag or URL, and what to do about it."""


def debugging() -> bool:
    """Whether ``SIDCORE_DEBUG`` asks for the traceback of user errors too."""
    return bool(os.environ.get("SIDCORE_DEBUG"))


def message(error: Exception) -> str:
    """The sentence of an error: an OS error's names its file; a ``KeyError``-like one drops the quotes ``str``
    adds."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return error.args[0] if error.args else str(error)
