"""User-facing errors: one clear sentence naming the file and the fix."""

from __future__ import annotations


class TpasError(Exception):
    """An error caused by bad input or configuration; the CLIs print it without a traceback."""
