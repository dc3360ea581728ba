"""The activation store on disk: layout, manifest, writer and reader.

Layout of a store folder (what ``saescope harvest`` writes under ``<out>/store``)::

    manifest.json                      what was harvested, and every finished shard's SHA-256
    tokens.safetensors                 one row per stored token: token_id, seq, pos, doc_id, subset_id
    layer_12/resid_post/shard_00000.npy
    layer_12/resid_post/shard_00001.npy
    layer_12/attn_z/shard_00000.npy
    ...

Row ``r`` of shard group ``g`` holds store row ``g * shard_tokens + r`` for *every* site, so the
sites of one token sit at the same place in each site's folder and ``tokens.safetensors`` says
which token it was.  Shards are plain ``.npy`` arrays ``(rows, width)``: little-endian float32, or
bfloat16 stored as its uint16 bit pattern (``np.load`` reads both; convert bf16 with
``torch.from_numpy(a).view(torch.bfloat16)``).  Nothing is pickled.

Crash safety.  Every file is written under a temporary name and renamed into place, and a shard
group enters ``manifest.json`` (itself replaced atomically) only once all its site files are in
place.  A harvest killed at any moment therefore leaves a manifest that lists only finished,
checksummed groups; the next run resumes at the first missing group and overwrites whatever
partial files it finds there.  (Files are not fsync'ed: a process kill cannot lose page-cache
data, and a power loss would surface as a checksum failure, never as silently wrong data.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saescope.activations.shuffle import Bucket, BucketedSource, chunk_plan, chunks
from saescope.errors import IntegrityError
from saescope.settings import PAIR_KINDS
from saescope.sites import Site, data_sites

FORMAT = "saescope-activations/1"
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
#: storage dtype name -> numpy dtype of the bytes on disk
DISK_DTYPES = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}


def shard_file(site: Site, index: int) -> str:
    """Path of a shard relative to the store root, e.g. ``layer_3/attn_z/shard_00002.npy``."""
    return f"{site.name}/shard_{index:05d}.npy"


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict) -> None:
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    from saescope.jsonio import read_json  # names the file when it is not JSON

    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saescope activation store manifest (format {manifest.get('format')!r})")
    return manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


# --------------------------------------------------------------------------------------------
# Creating or resuming a store


#: names of a model or corpus: compared as resolved paths (``./tiny`` and ``/abs/tiny`` resume one
#: store), and left out of the store's fingerprint (what they name is in model_*_sha256, corpus_sha256)
NAME_KEYS = ("model", "corpus")


def config_differs(key: str, have: Any, want: Any) -> bool:
    """Whether a store's recorded setting ``key`` and the requested one differ."""
    if key in NAME_KEYS and isinstance(have, str) and isinstance(want, str):
        from saescope.corpora import canonical_name

        return canonical_name(have) != canonical_name(want)
    return have != want

_WHAT_DIFFERS = {
    "model_config_sha256": "the model's config differs",
    "model_weights_sha256": "the model's weights differ",
    "model_dtype": "the model's dtype differs",
    "dtype": "the storage dtype differs",
}


def _describe_mismatch(key: str, have: Any, want: Any, stored: dict, header: dict) -> str:
    if key == "corpus_sha256":
        return (
            f"the tokenized corpus differs (corpus_sha256 {have} vs {want}: the store holds {stored['n_tokens']} "
            f"tokens in {stored['n_sequences']} sequences, requested {header['n_tokens']} in {header['n_sequences']})"
        )
    if key in _WHAT_DIFFERS:
        return f"{_WHAT_DIFFERS[key]} ({key}: store {have!r}, requested {want!r})"
    if key == "sites":
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        parts = [f"{len(have)} sites in the store, {len(want)} requested"]
        if missing:
            parts.append(f"not in the store: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"only in the store: {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}")
        return "sites differ (" + "; ".join(parts) + ")"
    return f"{key} differs (store: {have!r}, requested: {want!r})"


def prepare_store(root: Path, header: dict, tokens: dict[str, np.ndarray]) -> dict:
    """Create the store at ``root`` or reopen it for resuming; return its manifest.

    ``header`` holds ``config`` (everything that must match to resume: model, corpus, sites,
    dtype, shard size), ``widths`` and ``n_tokens``; ``tokens`` the per-row metadata arrays.
    Refuses a folder holding another store or other files, and fails before writing anything
    when the disk cannot hold what is left to harvest.
    """
    from safetensors.numpy import save as st_save

    root = Path(root)
    manifest = read_manifest(root)
    if manifest is not None:
        problems = [
            _describe_mismatch(k, manifest["config"].get(k), v, manifest, header)
            for k, v in header["config"].items()
            if config_differs(k, manifest["config"].get(k), v)
        ]
        if problems:
            raise ValueError(
                f"output folder {root} holds an activation store made with another configuration: "
                + "; ".join(problems)
                + ". Use another output folder (or delete this one)."
            )
        if manifest["complete"]:
            return manifest
        for group in manifest["shards"]:  # finished shards must still be there (a cheap stat)
            for entry in group["files"].values():
                path = root / entry["file"]
                if not path.exists() or path.stat().st_size != entry["bytes"]:
                    raise IntegrityError(
                        f"finished shard {entry['file']} of the activation store in {root} is missing or "
                        "truncated; delete the store and harvest again"
                    )
    elif root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):
        raise ValueError(f"output folder {root} is not empty and holds no activation store ({MANIFEST} missing)")

    done_rows = sum(s["rows"] for s in manifest["shards"]) if manifest else 0
    row_bytes = sum(header["widths"].values()) * DISK_DTYPES[header["config"]["dtype"]].itemsize
    tokens_bytes = st_save(tokens)
    needed = (header["n_tokens"] - done_rows) * row_bytes + len(tokens_bytes)
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise RuntimeError(
            f"not enough disk space for the activation store in {root}: it needs about "
            f"{human_bytes(needed)} ({needed} bytes) more, and {probe} has {human_bytes(free)} ({free} bytes) free"
        )

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("**/.*.tmp-*"):  # leftovers of a killed run
        stale.unlink()
    tokens_sha = hashlib.sha256(tokens_bytes).hexdigest()
    if manifest is None:
        manifest = {"format": FORMAT, **header, "tokens_sha256": tokens_sha, "shards": [], "complete": False}
        write_manifest(root, manifest)
    if not (root / TOKENS_FILE).exists() or sha256_file(root / TOKENS_FILE) != manifest["tokens_sha256"]:
        write_atomic(root / TOKENS_FILE, tokens_bytes)
    return manifest


# --------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """An activation store on disk (read-only view).

    ``sites``, ``d_in`` (site -> width) and ``n_tokens`` (stored rows per site) describe it;
    :meth:`read` returns float32 rows of one shard, checking the shard's SHA-256 the first time
    it is touched; :meth:`verify` checks every file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise FileNotFoundError(f"no activation store at {self.path} ({MANIFEST} missing)")
        self.manifest = manifest
        self.sites: list[Site] = [Site.parse(s) for s in manifest["config"]["sites"]]
        self.d_in: dict[Site, int] = {Site.parse(s): int(w) for s, w in manifest["widths"].items()}
        self.n_tokens: int = int(manifest["n_tokens"])
        self.dtype: str = manifest["config"]["dtype"]
        self.shard_tokens: int = int(manifest["config"]["shard_tokens"])
        self._verified: set[str] = set()

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def fingerprint(self) -> str:
        """The store's identity: SHA-256 (16 hex digits) of its configuration (names excepted),
        widths, token metadata's and every shard's SHA-256.  Two stores of the same data agree;
        a training run records it, so a resume pointed at another store is refused."""
        config = {k: v for k, v in self.manifest["config"].items() if k not in NAME_KEYS}
        shards = [[g["files"][s]["sha256"] for s in sorted(g["files"])] for g in self.shards]
        text = json.dumps([config, self.manifest["widths"], self.manifest["tokens_sha256"], shards], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def shards(self) -> list[dict]:
        """Finished shard groups: ``{"index", "row_start", "rows", "files": {site: {...}}}``."""
        return self.manifest["shards"]

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete, {len(self.shards)} shard groups"
        return f"ActivationStore({str(self.path)!r}, {len(self.sites)} sites, {self.n_tokens} tokens, {state})"

    def require_complete(self) -> None:
        if not self.complete:
            raise RuntimeError(
                f"activation store {self.path} is incomplete ({len(self.shards)} shard groups finished): "
                "the harvest was interrupted; rerun it with the same arguments to finish"
            )

    def _check(self, site: Site, index: int) -> Path:
        entry = self.shards[index]["files"][site.name]
        path = self.path / entry["file"]
        if entry["file"] in self._verified:
            return path
        if not path.exists():
            raise IntegrityError(f"missing shard {path} in activation store {self.path}; delete the store and "
                                 "harvest again")
        size, digest = path.stat().st_size, None
        if size == entry["bytes"]:
            digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise IntegrityError(
                f"corrupted shard {entry['file']} in activation store {self.path}: its SHA-256 does not match "
                f"the manifest ({size} bytes, expected {entry['bytes']}); delete the store and harvest again"
            )
        self._verified.add(entry["file"])
        return path

    def read(
        self, site: Site, index: int, start: int = 0, stop: int | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of shard ``index`` of ``site`` as float32 (checksum verified on the
        shard's first read), copied into ``out`` when given (one copy from the file's pages)."""
        path = self._check(site, index)
        rows = np.load(path, mmap_mode="r")[start:stop]
        if out is None:
            out = torch.empty(rows.shape, dtype=torch.float32)
        if self.dtype == "bfloat16":
            out.copy_(torch.from_numpy(np.array(rows)).view(torch.bfloat16))
        else:
            out.numpy()[...] = rows
        return out

    def tokens(self) -> dict[str, np.ndarray]:
        """Per-row metadata: ``token_id``, ``seq``, ``pos``, ``doc_id``, ``subset_id`` (``n_tokens`` each)."""
        from safetensors.numpy import load_file

        path = self.path / TOKENS_FILE
        if not path.is_file() or sha256_file(path) != self.manifest["tokens_sha256"]:
            raise IntegrityError(f"corrupted or missing token metadata {path}: its SHA-256 does not match the "
                                 "manifest; rerun the same harvest to rewrite it")
        return load_file(path)

    def verify(self) -> None:
        """Check every shard's (and the token file's) SHA-256; raise naming every bad file."""
        bad = []
        for index, group in enumerate(self.shards):
            for name in group["files"]:
                try:
                    self._verified.discard(group["files"][name]["file"])
                    self._check(Site.parse(name), index)
                except IntegrityError:
                    bad.append(group["files"][name]["file"])
        tokens = self.path / TOKENS_FILE
        if not tokens.is_file() or sha256_file(tokens) != self.manifest["tokens_sha256"]:
            bad.append(TOKENS_FILE)
        if bad:
            raise IntegrityError(f"activation store {self.path}: corrupted or missing files: {', '.join(bad)}")


class StoreReader(BucketedSource):
    """Shuffled batches from an activation store: a :class:`~saescope.activations.source.BatchSource`.

    Shards are cut into chunks of ``buffer_tokens // 16`` rows; each epoch the chunks are put in a
    random order and taken 16 at a time (a *bucket* of ``buffer_tokens`` rows, drawn from all over
    the store), whose rows are then permuted together (see :mod:`saescope.activations.shuffle`).  Memory stays
    at one or two buckets (``prefetch``) whatever the store's size.  Default ``buffer_tokens``:
    2^18, capped at 2 GiB of float32 for the sites read.
    """

    def __init__(
        self,
        path: str | Path | ActivationStore,
        sites: list[Site | str] | None = None,
        *,
        buffer_tokens: int | None = None,
        prefetch: bool = True,
    ):
        self.store = path if isinstance(path, ActivationStore) else ActivationStore(path)
        self.store.require_complete()
        if sites is None:
            wanted = list(self.store.sites)
        else:  # Site objects or names like "layer_3/mlp_out"; a transcoder site reads its two halves
            asked = [Site.parse(s) if isinstance(s, str) else s for s in sites]
            wanted = data_sites(asked)
        unknown = [s.name for s in wanted if s not in self.store.d_in]
        if unknown:
            pairs = sorted({a.name for a in asked if a.kind in PAIR_KINDS}) if sites is not None else []
            raise ValueError(f"sites not in the activation store {self.store.path}: {', '.join(unknown)}"
                             + (f" ({', '.join(pairs)} read and predict them: harvest with --sites including "
                                "transcoder)" if pairs else ""))
        self.sites: list[Site] = wanted
        self.d_in: dict[Site, int] = {s: self.store.d_in[s] for s in wanted}
        self._set_buffer(buffer_tokens, prefetch)
        self._chunks = chunks([group["rows"] for group in self.store.shards], self.buffer_tokens, self.store.shard_tokens)

    @property
    def n_tokens(self) -> int:
        return self.store.n_tokens

    def data_identity(self) -> dict:
        """The store's fingerprint, and the corpus, seq_len and model weights it was made from."""
        config = self.store.manifest["config"]
        return {"store_sha256": self.store.fingerprint,
                **{k: config.get(k) for k in ("corpus_sha256", "seq_len", "model_weights_sha256")}}

    def _plan(self, seed: int, epoch: int) -> list[Bucket]:
        return chunk_plan(self._chunks, seed, epoch, self.buffer_tokens)

    def _load(self, bucket: Bucket, epoch: int = 0) -> dict[Site, torch.Tensor]:
        out = {}
        for site in self.sites:
            x = torch.empty(bucket.rows, self.d_in[site])
            at = 0
            for g, a, b in bucket.pieces:
                self.store.read(site, g, a, b, out=x[at : at + b - a])
                at += b - a
            out[site] = x
        return out

