"""Output folders are checked before any compute: a path that is a file, a folder saescope may
not write, or a read-only disk should fail in the first second, not after the model has run.
Light: no torch."""

from __future__ import annotations

import os
from pathlib import Path

from saescope.errors import UserError, describe_os_error


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written in it;
    raise :class:`UserError` naming ``flag`` and the path otherwise.  Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: choose another path or move the file away")
    probe = path / f".saescope-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be written: {describe_os_error(err)}") from None
    return path
