"""User-facing errors. The CLI prints these on one line, without a traceback, and exits with the error's code.

Exit codes (the same for every verb): 0 ok, 1 failure (:class:`PermsparseError`), 2 usage error (:class:`UsageError`,
and argparse's own), 3 verification refused to write the output (:class:`VerificationError`), 130 interrupted.
"""

from __future__ import annotations


class PermsparseError(Exception):
    """An error caused by the input or the environment, with a message that says how to fix it."""

    exit_code = 1


class UsageError(PermsparseError):
    """Options that contradict each other or are out of range (the command line was wrong, nothing ran)."""

    exit_code = 2


class VerificationError(PermsparseError):
    """A model failed one of permsparse's own checks (fold equivalence, N:M validity): nothing was written."""

    exit_code = 3


class Interrupted(PermsparseError):
    """SIGINT/SIGTERM arrived: work stopped, temporary files removed, no partial output left."""

    exit_code = 130
