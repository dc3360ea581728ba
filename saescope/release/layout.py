"""Where release folders are and what they are: names, discovery and the site of a folder.

A release folder holds ``params.npz`` (or ``params.safetensors``), usually ``config.json`` and,
once trained or evaluated, ``metrics.json``.  Ours live at
``<root>/<kind>/layer_<L>/width_<W>/average_l0_<K>``; Gemma Scope's at
``<repo>/layer_<L>/width_<W>/average_l0_<K>`` with the kind in the repository name
(``gemma-scope-2b-pt-res`` / ``-mlp`` / ``-att``) and no config.json.  Every stage (eval, report,
features) finds folders and reads their site here, so all of them accept the same folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from saescope.sites import KNOWN_KINDS, Site

PARAMS_NPZ = "params.npz"
PARAMS_SAFETENSORS = "params.safetensors"
PARAM_FILES = (PARAMS_NPZ, PARAMS_SAFETENSORS)
CONFIG_JSON = "config.json"
#: ``sha256sum`` lines for the files above (not metrics.json, which eval extends): written last by
#: :func:`saescope.release.save.save_sae`, checked by every load; Gemma Scope's folders have none
CHECKSUMS = "SHA256SUMS"
METRICS_JSON = "metrics.json"
#: Gemma Scope repositories (google/gemma-scope-2b-pt-res, …; in the hub cache models--google--…)
GEMMA_SCOPE_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)(?![a-z])")
GEMMA_SCOPE_KINDS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
#: the tail of a Gemma Scope 2 SAE folder's path, ``{site}[_all]/layer_L_width_W_l0_LABEL[_affine]``
#: (:mod:`saescope.release.gemma_scope_2`; a trailing ``_2`` … is ours: two SAEs with one label)
GS2_FOLDER = re.compile(
    r"(?:^|/)(resid_post|attn_out|mlp_out|transcoder)(_all)?/"
    r"layer_(\d+)_width_(\d+[km]?)_l0_([a-z0-9]+?)(_affine)?(?:_(\d+))?$"
)
#: Gemma Scope 2's site folders → saescope site kinds (its attn_out is the o_proj input: attn_z)
GS2_KINDS = {"resid_post": "resid_post", "attn_out": "attn_z", "mlp_out": "mlp_out", "transcoder": "transcoder"}
#: the tail every release folder's path ends with
RELEASE_TAIL = re.compile(r"(?:^|/)layer_(\d+)/width_([0-9]+[km]?)/average_l0_(\d+)$")


# --- names ----------------------------------------------------------------------------------


def width_label(d_sae: int) -> str:
    """Gemma Scope's width names: 16384 → '16k', 65536 → '65k', 2**20 → '1m', 4096 → '4k'
    (decimal thousands, rounded down); widths that are not a multiple of 1024 stay numbers."""
    if d_sae % 1024:
        return str(d_sae)
    if d_sae >= 2**20:
        return f"{d_sae // 10**6}m"
    return f"{d_sae // 1000}k"


def release_folder(root: str | Path, site: Site | str, d_sae: int, average_l0: float) -> Path:
    """``<root>/<site.kind>/layer_<L>/width_<W>/average_l0_<K>``, K the rounded average L0."""
    site = Site.parse(site) if isinstance(site, str) else site
    return Path(root) / site.kind / f"layer_{site.layer}" / f"width_{width_label(d_sae)}" / f"average_l0_{round(average_l0)}"


def unique_folder(folder: Path, used: set[Path]) -> Path:
    """``folder``, or ``folder_2``, ``folder_3`` … if taken (two λ or seeds that end at the same
    rounded L0); the name chosen is added to ``used``."""
    chosen, n = folder, 2
    while chosen in used:
        chosen, n = folder.with_name(f"{folder.name}_{n}"), n + 1
    used.add(chosen)
    return chosen


# --- discovery ------------------------------------------------------------------------------


def release_root(run_or_release: str | Path) -> Path:
    """``<run>/release`` when given a run directory, else the folder itself."""
    path = Path(run_or_release)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path / "release" if (path / "release").is_dir() else path


#: what marks a folder in SAELens's format (saescope/release/saelens.py reads it)
SAELENS_MARKER = "sae_weights.safetensors"


def is_sae_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in (*PARAM_FILES, SAELENS_MARKER))


def find_sae_folders(root: str | Path) -> list[Path]:
    """Every SAE folder at or under ``root`` (ours and Gemma Scope's), sorted by path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"release folder {root} does not exist")
    if is_sae_folder(root):
        return [root]
    # a hidden folder (".average_l0_52.tmp-…" of a release killed while writing) is never an SAE
    found = sorted({p.parent for name in (*PARAM_FILES, SAELENS_MARKER) for p in root.rglob(name)
                    if not any(part.startswith(".") for part in p.relative_to(root).parts)})
    if not found:
        raise FileNotFoundError(f"no SAE under {root} (looked for {' or '.join(PARAM_FILES)})")
    return found


def remove_stale(root: str | Path) -> list[Path]:
    """Delete the temporary folders (``.<name>.tmp-…``, ``.<name>.old-…``) that a release killed
    while writing left under ``root``; the caller holds the release's lock, so no live process
    owns them.  Returns what was removed."""
    import shutil

    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.rglob(".*") if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def folder_name(folder: Path, root: Path) -> str:
    """An SAE's name in a release: its path under the root (the folder's own name if it is the root)."""
    return folder.relative_to(root).as_posix() if folder != root else folder.name


# --- what a folder is -----------------------------------------------------------------------


def _config_value(config: dict | None, key: str):
    if not config:
        return None
    # ours at the top; SAELens's under metadata; ours in a Gemma Scope 2 config.json under saescope
    return config.get(key) or (config.get("metadata") or {}).get(key) or (config.get("saescope") or {}).get(key)


def folder_site(folder: Path, config: dict | None = None, kind: str | None = None) -> Site:
    """The site of an SAE folder: ``config.json``'s ``site``, else read from the path.

    ``kind`` overrides the kind (for folders whose path does not say it).
    """
    name = _config_value(config, "site")
    if name and kind is None:
        return Site.parse(name)
    gs2 = GS2_FOLDER.search(folder.resolve().as_posix())
    if gs2 and GS2_KINDS[gs2.group(1)] in KNOWN_KINDS:
        return Site(int(gs2.group(3)), kind or GS2_KINDS[gs2.group(1)])
    layer = path_kind = None
    for part in reversed(folder.resolve().parts):
        m = re.fullmatch(r"layer_(\d+)", part)
        if m and layer is None:
            layer = int(m.group(1))
        if path_kind is None:
            if part in KNOWN_KINDS:
                path_kind = part
            elif repo := GEMMA_SCOPE_REPO.search(part):
                path_kind = GEMMA_SCOPE_KINDS[repo.group(3)]
    if name and kind is not None:
        layer = Site.parse(name).layer
    kind = kind or path_kind
    if layer is None or kind is None:
        raise ValueError(
            f"cannot tell the site of {folder}: its config.json has no 'site' and the path does not "
            f"name both a 'layer_<L>' folder and a kind ({', '.join(KNOWN_KINDS)}); pass the kind explicitly"
        )
    return Site(layer, kind)


def folder_model(folder: Path) -> str | None:
    """The model named in an SAE folder's ``config.json`` (``model``), if any."""
    from saescope.jsonio import read_json

    return _config_value(read_json(folder / CONFIG_JSON), "model")
