"""SAE folders named by Hugging Face repo id + path, e.g.
``google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82``.

The local Hugging Face cache is read first (laid out by ``huggingface_hub``:
``models--owner--name/snapshots/<commit>/<path>``, ``refs/main`` naming the commit), so a folder
downloaded once loads with no network; otherwise ``huggingface_hub`` downloads just that folder
where a hub is reachable.  When neither works the error names the repo, the path and the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

#: owner/name/path/inside/the/repo (an optional hf:// in front)
_HUB_SPEC = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)/([^\s]+)$")


def parse_hub_spec(spec: str) -> tuple[str, str] | None:
    """(repo id, path in the repo), or None when ``spec`` cannot be one."""
    match = _HUB_SPEC.match(str(spec).strip())
    if not match or ".." in match.group(2).split("/"):
        return None
    return match.group(1), match.group(2).strip("/")


def resolve_hub_folder(spec: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder holding ``repo/path`` (cache first, then a download of that folder only)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    parsed = parse_hub_spec(spec)
    if parsed is None:
        raise FileNotFoundError(f"{spec}: no such local folder, and not a Hugging Face 'owner/repo/path'")
    repo, inside = parsed
    patterns = [f"{inside}/*"]
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        snapshot = snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir,
                                     local_files_only=True)
        folder = Path(snapshot) / inside
        if not _holds_params(folder):
            raise LocalEntryNotFoundError(f"{folder} is not in the cache")
        return folder
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{spec}: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                                f"download it where a hub is reachable (huggingface-cli download {repo} "
                                f"--include '{inside}/*') or give a local folder") from None
    try:
        snapshot = snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir)
    except Exception as err:  # no network, unknown repo, gated repo: huggingface_hub's own types
        raise FileNotFoundError(f"{spec}: not in the local Hugging Face cache ({cache}) and the hub could not "
                                f"provide it ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    folder = Path(snapshot) / inside
    if not _holds_params(folder):
        raise FileNotFoundError(f"{spec}: the repo {repo} has no SAE files under {inside}/ "
                                "(expected params.npz, params.safetensors or SAELens's sae_weights.safetensors)")
    return folder


def _holds_params(folder: Path) -> bool:
    from saescope.release.layout import is_sae_folder

    return folder.is_dir() and is_sae_folder(folder)
