"""Errors a person can act on.

A ``UserError`` is a problem with what the user gave (a config key, a file, a flag, a download): the
``sidcore`` command prints its message, naming the culprit and what to do, in a line or a few and
without a traceback (``SIDCORE_DEBUG=1`` or ``--debug`` shows it). Any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the file, key, flag or URL, and what to do about it."""
