"""The exceptions a user can act on.

The CLI turns :class:`UserError` (and the standard ``ValueError`` / ``FileNotFoundError`` /
``PermissionError`` / ``OSError`` family) into one line and exit code 1; anything else is a bug and
keeps its traceback.  Raise these with a message that names the file or setting at fault and says
what to do.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a state the user can fix: one line, exit code 1, no traceback."""


class IntegrityError(UserError):
    """A file saescope wrote and reads back failed its check (checksum, size, schema):
    the message names the file and how to recover (an earlier checkpoint, a rerun)."""


class LockedError(UserError):
    """Another live process is writing the same output folder (the message names its pid)."""


def warn(message: str) -> None:
    """One warning line on stderr (a fallback taken, a stale file removed): the run goes on."""
    import sys

    print(f"saescope: warning: {message}", file=sys.stderr, flush=True)
