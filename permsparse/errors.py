"""User-facing errors. The CLI prints these without a traceback and exits non-zero."""

from __future__ import annotations


class PermsparseError(Exception):
    """An error caused by the input or the environment, with a message that says how to fix it."""
