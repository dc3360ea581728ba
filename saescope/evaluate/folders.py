"""Release folders as the evaluation and the report see them: find them, read their site, write JSON.

A release folder holds ``params.npz`` (or ``params.safetensors``), usually ``config.json`` and,
once evaluated, ``metrics.json``.  Ours live at ``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>``;
Gemma Scope's at ``<repo>/layer_<L>/width_<W>/average_l0_<K>`` with the kind in the repository
name (``gemma-scope-2b-pt-res`` / ``-mlp`` / ``-att``) and no config.json.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from saescope.sites import SITE_KINDS, Site

PARAM_FILES = ("params.npz", "params.safetensors")
#: Gemma Scope repositories (google/gemma-scope-2b-pt-res, …; in the hub cache models--google--…)
GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-\d+b-(?:pt|it)-(res|mlp|att)(?![a-z])")
GEMMA_SCOPE_KINDS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}


def is_sae_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in PARAM_FILES)


def find_sae_folders(root: str | Path) -> list[Path]:
    """Every SAE folder at or under ``root``, sorted by path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"release folder {root} does not exist")
    if is_sae_folder(root):
        return [root]
    found = sorted({p.parent for name in PARAM_FILES for p in root.rglob(name)})
    if not found:
        raise FileNotFoundError(f"no SAE under {root} (looked for {' or '.join(PARAM_FILES)})")
    return found


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if the file does not exist."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _finite(obj):
    """NaN/inf -> None, so the file is strict JSON (browsers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _config_value(config: dict | None, key: str):
    if not config:
        return None
    return config.get(key) or (config.get("metadata") or {}).get(key)


def folder_site(folder: Path, config: dict | None = None, kind: str | None = None) -> Site:
    """The site of an SAE folder: ``config.json``'s ``site``, else read from the path.

    ``kind`` overrides the kind (for folders whose path does not say it).
    """
    name = _config_value(config, "site")
    if name and kind is None:
        return Site.parse(name)
    layer = path_kind = None
    for part in reversed(folder.resolve().parts):
        m = re.fullmatch(r"layer_(\d+)", part)
        if m and layer is None:
            layer = int(m.group(1))
        if path_kind is None:
            if part in SITE_KINDS:
                path_kind = part
            elif repo := GEMMA_SCOPE_REPO.search(part):
                path_kind = GEMMA_SCOPE_KINDS[repo.group(1)]
    if name and kind is not None:
        layer = Site.parse(name).layer
    kind = kind or path_kind
    if layer is None or kind is None:
        raise ValueError(
            f"cannot tell the site of {folder}: its config.json has no 'site' and the path does not "
            f"name both a 'layer_<L>' folder and a kind ({', '.join(SITE_KINDS)}); pass the kind explicitly"
        )
    return Site(layer, kind)


def folder_model(folder: Path) -> str | None:
    """The model named in an SAE folder's ``config.json`` (``model``), if any."""
    return _config_value(read_json(folder / "config.json"), "model")
