"""The one way saescope writes JSON: strict JSON (NaN and ±Inf become ``null``, which browsers and
other languages read), written atomically (a temporary file renamed into place, fsync'ed first),
so a reader never sees half a file.  Light: no torch, no numpy."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj`` (paths and other objects as their ``str``)."""
    return json.dumps(finite(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str)


def write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None if there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        what = "not UTF-8 text (a binary file?)" if isinstance(err, UnicodeDecodeError) else f"not valid JSON ({err})"
        raise ValueError(f"{path}: {what}; restore or delete it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    return obj
