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


def os_reason(exc: OSError, path: object = None) -> str:
    """Why an OS call on ``path`` (default: the error's filename) failed, in words that say what to change.

    "File exists" / "Not a directory" from creating a folder mean that a file sits where a folder is needed: name
    that file instead of repeating the OS's words.
    """
    import errno
    from pathlib import Path

    target = path if path is not None else getattr(exc, "filename", None)
    if target is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        p = Path(str(target))
        for candidate in (p, *p.parents):
            if candidate.exists() and not candidate.is_dir():
                return f"{candidate} is a file, not a folder"
    return exc.strerror or str(exc)
