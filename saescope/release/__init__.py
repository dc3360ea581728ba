"""Release folders, in one place: their layout and discovery (``layout``), the params file
(``arrays``), loading (``load``), writing (``save``) and ``metrics.json`` with the canonical SAE
per site (``metrics``).  Eval, report and features read releases only through this package.

The names below load their module on first use, so ``import saescope.release`` stays light.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "width_label": "layout", "release_folder": "layout", "unique_folder": "layout", "release_root": "layout",
    "find_sae_folders": "layout", "folder_site": "layout", "folder_model": "layout", "folder_name": "layout",
    "RELEASED_ARRAYS": "arrays",
    "load_sae": "load", "load_release": "load", "read_release_folder": "load", "ReleasedSAE": "load",
    "save_sae": "save", "export_safetensors": "save", "release_trained": "save",
    "read_metrics": "metrics", "write_section": "metrics", "choose_canonical": "metrics",
    "write_canonical": "metrics", "read_canonical": "metrics", "CANONICAL_L0": "metrics",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"saescope.release.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saescope.release' has no attribute {name!r}")
