"""Exports of a release for other libraries (the formats live beside: :mod:`saescope.release.saelens`)."""

from __future__ import annotations

from pathlib import Path

from saescope.release.saelens import CFG_JSON, WEIGHTS, saelens_config


def export_folder(folder: Path, out: Path, root: Path | None = None) -> Path:
    """One release folder as a SAELens folder ``out``; returns ``out``."""
    from safetensors.torch import save_file

    from saescope.jsonio import write_json
    from saescope.release.load import read_release_folder

    released = read_release_folder(folder, root)
    cfg = saelens_config(released.sae, released.site, released.config)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in released.sae.to_arrays().items()}
    save_file(tensors, str(out / WEIGHTS))
    write_json(out / CFG_JSON, cfg, indent=1)
    return out


def export_saelens(path: str | Path, out: str | Path) -> list[Path]:
    """Every SAE folder at or under ``path`` (a release, a run's release or one folder) as SAELens
    folders under ``out``, named by their place in the release.  Returns the folders written."""
    from saescope.release.layout import find_sae_folders, release_root

    path = Path(path)
    root = release_root(path) if (path / "release").is_dir() else path
    folders = find_sae_folders(root)
    if not folders:
        raise FileNotFoundError(f"no SAE folder at or under {root}")
    out = Path(out)
    written = []
    for folder in folders:
        relative = folder.relative_to(root) if folder != root else Path(folder.name)
        written.append(export_folder(folder, out / relative, root))
    return written
