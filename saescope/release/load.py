"""Loading releases: one SAE folder (:func:`load_sae`), or every SAE of a release with its site,
config and metrics (:func:`load_release`, the counterpart of other libraries' ``load_many``).

Gemma Scope's folders (``params.npz`` only) load unchanged: their config is inferred from the
path as SAELens does, their site from :func:`saescope.release.layout.folder_site`.  Gemma Scope
2's folders (lowercase keys in ``params.safetensors``, a small config.json or none) load
through :mod:`saescope.release.gemma_scope_2`.  SAELens's
folders (``cfg.json`` + ``sae_weights.safetensors``) load through :mod:`saescope.release.saelens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saescope.errors import IntegrityError
from saescope.jsonio import read_json
from saescope.release import gemma_scope_2
from saescope.release.arrays import RELEASED_ARRAYS, check_arrays, params_file, read_arrays, standard_names
from saescope.release.layout import (
    CHECKSUMS,
    CONFIG_JSON,
    GEMMA_SCOPE_REPO,
    RELEASE_TAIL,
    find_sae_folders,
    folder_name,
    folder_site,
    width_label,
)
from saescope.release.metrics import read_metrics
from saescope.sae.base import SAE, SAEConfig
from saescope.sites import Site


@dataclass
class ReleasedSAE:
    """One SAE of a release and what its folder says about it."""

    #: its path under the release root (the folder's name when the root is the folder)
    name: str
    folder: Path
    site: Site
    sae: SAE
    #: config.json, or what the path told (Gemma Scope's folders)
    config: dict[str, Any]
    #: metrics.json (sections ``training`` and ``eval``), {} if none
    metrics: dict[str, Any]


def infer_config(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A config for a folder without config.json (Gemma Scope's releases), from its path."""
    posix = folder.resolve().as_posix()
    tail = RELEASE_TAIL.search(posix)
    repo = GEMMA_SCOPE_REPO.search(posix)
    if "threshold" not in arrays and not (tail or repo):
        raise ValueError(
            f"{folder}: no {CONFIG_JSON} and no threshold array, so the architecture cannot be told; "
            f"only JumpReLU releases (Gemma Scope's) can be loaded without a config"
        )
    config: dict[str, Any] = {"architecture": "jumprelu", "source": "inferred from the path"}
    if tail:
        config.update(layer=int(tail.group(1)), width=tail.group(2), average_l0=int(tail.group(3)))
    if repo:
        size, variant, _ = repo.groups()
        config["model"] = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
    try:
        config["site"] = folder_site(folder).name
    except ValueError:
        pass  # the path does not say; callers may name the kind (saescope eval --kind)
    return config


def verify_checksums(folder: Path) -> None:
    """Check the files a saescope release folder lists in ``SHA256SUMS`` (Gemma Scope's folders
    have none and load unchecked); raise :class:`~saescope.errors.IntegrityError` naming the
    first damaged or missing file."""
    from saescope.activations.store import sha256_file

    sums = folder / CHECKSUMS
    if not sums.is_file():
        return
    advice = ("restore the folder from a copy, or release it again (rerun the `saescope train` or `saescope run` "
              "that wrote it: its checkpoints hold the trained SAE)")
    for line_no, line in enumerate(sums.read_text(errors="replace").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if not name or len(digest) != 64 or "/" in name:
            raise IntegrityError(f"{sums}:{line_no}: not a sha256sum line; {advice}")
        target = folder / name
        if not target.is_file():
            raise IntegrityError(f"release file {target} is missing; {advice}")
        if sha256_file(target) != digest:
            raise IntegrityError(f"release file {target} is damaged (its SHA-256 does not match {sums}); {advice}")


def params_file_or_none(path: Path) -> Path | None:
    try:
        return params_file(path)
    except (FileNotFoundError, ValueError):
        return None


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a release folder (ours, Gemma Scope's or SAELens's), its params file, or a Hugging
    Face ``owner/repo/path/to/folder`` (from the local cache, else downloaded), as an SAE in
    release form (its site, config and metrics: :func:`read_release_folder`)."""
    return _load(local_path(path), device)[0]


def local_path(path: str | Path) -> Path:
    """``path`` itself when it exists here; else a Hugging Face repo path resolved to its folder
    in the local cache (:mod:`saescope.release.hub`)."""
    from saescope.release.hub import parse_hub_spec, resolve_hub_folder

    if Path(path).exists() or isinstance(path, Path) or parse_hub_spec(str(path)) is None:
        return Path(path)
    return resolve_hub_folder(str(path))


def _load(path: Path, device) -> tuple[SAE, dict[str, Any], Path]:
    from saescope.release.saelens import is_saelens_folder, read_saelens
    from saescope.sae.registry import ARCHITECTURES, build_sae

    if is_saelens_folder(path) and params_file_or_none(path) is None:  # SAELens's cfg.json + safetensors
        sae, config = read_saelens(path, device)
        return sae, config, path
    file = params_file(path)
    folder = file.parent
    verify_checksums(folder)
    arrays = standard_names(file, read_arrays(file))
    config = read_json(folder / CONFIG_JSON)
    if gemma_scope_2.is_gs2_config(config) or (config is None and gemma_scope_2.match_folder(folder)):
        config = gemma_scope_2.read_config(folder, config, arrays)
    elif config is None:
        config = infer_config(folder, arrays)
    architecture = config.get("architecture")
    if architecture not in RELEASED_ARRAYS or architecture not in ARCHITECTURES:
        raise ValueError(f"{folder / CONFIG_JSON}: unknown architecture {architecture!r}")
    d_in, d_sae = check_arrays(file, arrays, architecture)
    for key, actual in (("d_in", d_in), ("d_sae", d_sae)):
        if config.get(key, actual) != actual:
            raise ValueError(f"{folder}: config says {key} = {config[key]}, but the arrays have {key} = {actual}")
    if "width" in config and config["width"] != width_label(d_sae):
        raise ValueError(f"{folder}: the path says width_{config['width']}, but the arrays have d_sae = {d_sae}")

    saved = config["sae_config"] if isinstance(config.get("sae_config"), dict) else {}
    d_out = int(arrays["W_dec"].shape[1])
    if config.get("d_out", d_out) != d_out:
        raise ValueError(f"{folder}: config says d_out = {config['d_out']}, but the arrays have d_out = {d_out}")
    cfg = SAEConfig.from_dict({**saved, "d_in": d_in, "d_sae": d_sae, "d_out": d_out, "architecture": architecture,
                               "centre_input": False,
                               **({"k": int(config["k"])} if config.get("k") is not None else {})})
    with torch.random.fork_rng(devices=[]):  # initialisation is overwritten; keep the caller's RNG
        sae = build_sae(cfg)
    sae.load_arrays({name: torch.from_numpy(a) for name, a in arrays.items()})
    return sae.to(device), config, folder


def read_release_folder(path: str | Path, root: str | Path | None = None, *, kind: str | None = None,
                        device: str | torch.device = "cpu") -> ReleasedSAE:
    """One SAE folder with its site, config and metrics; ``kind`` names the site kind for
    folders whose config and path do not (``saescope eval --kind``)."""
    sae, config, folder = _load(local_path(path), device)
    site = folder_site(folder, config, kind)
    name = folder_name(folder, Path(root) if root is not None else folder)
    return ReleasedSAE(name, folder, site, sae, config, read_metrics(folder))


def load_release(root: str | Path, *, kind: str | None = None, device: str | torch.device = "cpu") -> list[ReleasedSAE]:
    """Every SAE folder at or under ``root`` (ours and Gemma Scope's), sorted by path."""
    root = Path(root)
    return [read_release_folder(f, root, kind=kind, device=device) for f in find_sae_folders(root)]
