"""Writing an activation store: shard files, and where finished shard groups are recorded.

A shard file is written under a temporary name while its SHA-256 is computed, and renamed into
place once its group is full.  A finished group is then *recorded*: in ``manifest.json`` itself
when one process harvests, or, when several do, in this rank's own part file
(``.harvest_parts/rank_<r>.json``), so no two processes ever write one file.  Rank 0 folds the
part files into the manifest (:func:`fold_into_manifest`), which only ever lists a gap-free prefix
of groups; finished groups beyond a gap wait in ``.harvest_parts/pending.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from saescope.activations.store import DISK_DTYPES, shard_file, write_atomic, write_manifest
from saescope.sites import Site

PARTS = ".harvest_parts"
PENDING = "pending.json"


def read_entries(path: Path) -> list[dict]:
    """The group entries of a part (or pending) file; [] when there is none."""
    try:
        return json.loads(path.read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []  # cannot happen for a file written atomically; a stray file adds nothing


def fold_into_manifest(root: Path, manifest: dict, entries: Iterable[dict] = ()) -> set[int]:
    """Merge ``entries``, ``pending.json`` and every rank's part file into the manifest's gap-free
    prefix of groups; keep the rest in ``pending.json``; delete the rank part files.  Returns the
    indices of every finished group."""
    parts = Path(root) / PARTS
    known = {g["index"]: g for g in manifest["shards"]}
    files = sorted(parts.glob("*.json")) if parts.exists() else []
    for g in entries:
        known.setdefault(g["index"], g)
    for path in files:
        for g in read_entries(path):
            known.setdefault(g["index"], g)
    prefix = []
    while len(prefix) in known:
        prefix.append(known.pop(len(prefix)))
    manifest["shards"] = prefix
    write_manifest(Path(root), manifest)
    if known or any(p.name == PENDING for p in files):
        parts.mkdir(exist_ok=True)
        write_atomic(parts / PENDING, json.dumps({"shards": [known[i] for i in sorted(known)]}).encode())
    for path in files:
        if path.name != PENDING:
            path.unlink()
    return {g["index"] for g in prefix} | set(known)


def part_recorder(path: Path, earlier: list[dict]) -> Callable[[list[dict]], None]:
    """A ``record`` for :class:`ShardWriter` that keeps one rank's finished groups in its part file
    (after the groups ``earlier`` writers of this launch finished)."""
    return lambda written: write_atomic(path, json.dumps({"shards": earlier + written}).encode())


class _HashingFile:
    """A write-only file that also feeds what it writes to a SHA-256."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 -- closed when its shard group is committed or dropped
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.file.write(view)
        self.bytes += len(view)


class ShardWriter:
    """Appends rows of every site, in store order, to the shard files of groups ``[first, end)``;
    each full group is renamed into place and handed to ``record`` with every group this writer
    finished so far (then ``on_shard(group_index)`` is called).

    ``threaded``: write in a background thread, so that copies, SHA-256 and disk writes overlap
    the next forward.  That clearly wins when the model runs on an accelerator and the host's
    cores idle; when the forward keeps every CPU core busy, the gain is smaller (the writer then
    competes with the forward's threads), and writing inline is the alternative.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict,
        first: int,
        end: int,
        record: Callable[[list[dict]], None],
        *,
        on_shard: Callable[[int], None] | None = None,
        threaded: bool = True,
        max_pending: int = 2,
    ):
        self.root = root
        self.record = record
        self.on_shard = on_shard
        #: the groups this writer finished, as manifest entries
        self.written: list[dict] = []
        self.sites = [Site.parse(s) for s in manifest["config"]["sites"]]
        self.widths = {Site.parse(s): w for s, w in manifest["widths"].items()}
        self.disk_dtype = DISK_DTYPES[manifest["config"]["dtype"]]
        self.shard_tokens = manifest["config"]["shard_tokens"]
        self.n_rows = manifest["n_tokens"]
        self.group, self.end = first, end
        self._open: dict[Site, tuple[_HashingFile, Path, Path]] | None = None
        self._filled = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="saescope-shard-writer", daemon=True)
            self._thread.start()

    # -- main thread -----------------------------------------------------------------------
    def put(self, arrays: dict[Site, np.ndarray], runs: list[tuple[int, int]]) -> None:
        """Queue the next rows: ``arrays[site][a:b]`` for each ``(a, b)`` in ``runs``, in order
        (arrays in the disk dtype; the writer holds them until written)."""
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._write((arrays, runs))
        else:
            self._queue.put((arrays, runs))

    def close(self) -> None:
        """Wait for the writer thread and check that every group was written."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self.group != self.end:
            raise RuntimeError(f"harvest stopped at shard group {self.group}, before {self.end}")

    def abort(self) -> None:
        """Stop without finishing: queued rows are dropped, the open group's files removed."""
        self._stop = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for f, tmp, _ in (self._open or {}).values():
            f.file.close()
            tmp.unlink(missing_ok=True)
        self._open = None

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if not self._stop:
                    self._write(item)
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread by put()/close()
            self._error = err
            while self._queue.get() is not None:  # keep the producer from blocking
                pass

    def _write(self, item: tuple[dict[Site, np.ndarray], list[tuple[int, int]]]) -> None:
        arrays, runs = item
        for a, b in runs:
            self._append(arrays, a, b)

    def _group_rows(self, group: int) -> int:
        return min(self.shard_tokens, self.n_rows - group * self.shard_tokens)

    def _open_group(self) -> None:
        rows = self._group_rows(self.group)
        self._open = {}
        for site in self.sites:
            final = self.root / shard_file(site, self.group)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            f = _HashingFile(tmp)
            header = {"descr": self.disk_dtype.str, "fortran_order": False, "shape": (rows, self.widths[site])}
            np.lib.format.write_array_header_1_0(f, header)
            self._open[site] = (f, tmp, final)
        self._filled = 0

    def _append(self, arrays: dict[Site, np.ndarray], at: int, stop: int) -> None:
        while at < stop:
            if self.group >= self.end:
                raise RuntimeError(f"harvest produced rows beyond shard group {self.end - 1}")
            if self._open is None:
                self._open_group()
            take = min(stop - at, self._group_rows(self.group) - self._filled)
            for site, (f, _, _) in self._open.items():
                f.write(np.ascontiguousarray(arrays[site][at : at + take]))
            at += take
            self._filled += take
            if self._filled == self._group_rows(self.group):
                self._commit()

    def _commit(self) -> None:
        files = {}
        for site, (f, tmp, final) in self._open.items():
            f.file.close()
            os.replace(tmp, final)
            files[site.name] = {"file": shard_file(site, self.group), "sha256": f.sha.hexdigest(), "bytes": f.bytes}
        self._open = None
        rows = self._group_rows(self.group)
        entry = {"index": self.group, "row_start": self.group * self.shard_tokens, "rows": rows, "files": files}
        self.written.append(entry)
        self.record(list(self.written))
        self.group += 1
        if self.on_shard is not None:
            self.on_shard(entry["index"])
