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


#: what an OSError's errno means to a user, and what to do about it
_OS_HINTS = {
    "ENOSPC": "no space left on device: free some space or choose another output folder, then rerun "
              "the same command (finished work is kept)",
    "EDQUOT": "disk quota exceeded: free some space or choose another output folder",
    "EROFS": "read-only file system: choose an output folder on a writable disk",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "ENOENT": "no such file or folder",
    "ENOTDIR": "not a folder (a file is in the way)",
    "EISDIR": "is a folder, not a file",
    "EEXIST": "already exists",
    "EMFILE": "too many open files (raise `ulimit -n`)",
    "EIO": "input/output error: the disk may be failing",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: what went wrong, on which path, what to do (never a bare errno)."""
    import errno

    name = errno.errorcode.get(err.errno or 0, "")
    what = _OS_HINTS.get(name) or (err.strerror or str(err))
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {what}" if paths else what


def warn(message: str) -> None:
    """One warning line on stderr (a fallback taken, a stale file removed): the run goes on."""
    import sys

    print(f"saescope: warning: {message}", file=sys.stderr, flush=True)
