"""Harvest: run a model over a tokenized corpus and write every requested site's activations
to an activation store (:mod:`saescope.store` describes the layout and its crash safety).

The hot loop is one forward per batch of sequences (all sites captured in that forward, which
stops after the deepest layer needed: no logits) and a hand-over of the captured tensors to a
:class:`ShardWriter`, which writes the runs of kept positions (BOS, EOS and padding skipped)
straight from them into the open shard files, hashes them, and commits each finished shard group
to the manifest: no gather copy on the CPU.  (On an accelerator the kept rows are gathered on
the device, so only they cross to the host.)  The writer runs in a background thread, so disk
writes and SHA-256 overlap the next forward (``HarvestConfig.writer_thread=False`` writes inline;
``benchmarks/harvest.py`` times both).  Memory: one batch of activations, plus at most
``max_pending`` batches queued for the writer; shard files grow on disk, not in memory, so shards
may be large.

Resuming restarts at the batch holding the first row of the first unfinished shard group, with
the same batch boundaries as before, so a resumed store is byte-identical to an uninterrupted
one (on the same device and batch size).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saescope.sites import Site, capture, site_width
from saescope.store import (
    DISK_DTYPES,
    ActivationStore,
    prepare_store,
    shard_file,
    write_manifest,
)
from saescope.stream import check_corpus, check_sites
from saescope.tokens import TokenizedCorpus


@dataclass
class HarvestConfig:
    #: how activations are stored: "float32" (exact) or "bfloat16" (half the disk)
    dtype: str = "float32"
    #: sequences per forward pass
    batch_seqs: int = 4
    #: rows per shard file (every site's shard g holds the same rows)
    shard_tokens: int = 2**15
    #: the model's name as recorded in the manifest (default: the model's name_or_path)
    model_name: str | None = None
    #: show a tqdm progress bar (tokens/s)
    progress: bool = True
    #: write shards in a background thread, overlapping the forwards (False: write inline)
    writer_thread: bool = True
    #: batches the writer thread may lag behind the forward passes
    max_pending: int = 2

    def __post_init__(self) -> None:
        if self.dtype not in DISK_DTYPES:
            raise ValueError(f"unknown store dtype {self.dtype!r}; use one of {', '.join(DISK_DTYPES)}")
        for name in ("batch_seqs", "shard_tokens", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _fingerprint(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def model_fingerprints(model: nn.Module) -> dict[str, str]:
    """A hash of the model's config and one of a sample of its weights (first and last values of
    every tensor): enough to tell two checkpoints of one architecture apart, in milliseconds."""
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    for volatile in ("transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"):
        cfg.pop(volatile, None)
    config_hash = _fingerprint(json.dumps(cfg, sort_keys=True, default=str).encode())
    samples = []
    for name, p in model.state_dict().items():
        flat = p.detach().flatten()
        sample = torch.cat([flat[:8], flat[-8:]]).to(device="cpu", dtype=torch.float64)
        samples += [name.encode(), str(tuple(p.shape)).encode(), sample.numpy().tobytes()]
    return {"model_config_sha256": config_hash, "model_weights_sha256": _fingerprint(*samples)}


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
    """Appends rows of every site, in store order, to shard files, and commits each full shard
    group to the manifest (then calls ``on_shard(group_index)``).

    ``threaded``: write in a background thread, so that copies, SHA-256 and disk writes overlap
    the next forward.  That clearly wins when the model runs on an accelerator and the host's
    cores idle; when the forward keeps every CPU core busy, the gain is smaller (the writer then
    competes with the forward's threads), and writing inline is the alternative.
    """

    def __init__(
        self,
        root: Path,
        manifest: dict,
        *,
        on_shard: Callable[[int], None] | None = None,
        threaded: bool = True,
        max_pending: int = 2,
    ):
        self.root = root
        self.manifest = manifest
        self.on_shard = on_shard
        self.sites = [Site.parse(s) for s in manifest["config"]["sites"]]
        self.widths = {Site.parse(s): w for s, w in manifest["widths"].items()}
        self.disk_dtype = DISK_DTYPES[manifest["config"]["dtype"]]
        self.shard_tokens = manifest["config"]["shard_tokens"]
        self.n_rows = manifest["n_tokens"]
        self.n_groups = -(-self.n_rows // self.shard_tokens)
        self.group = len(manifest["shards"])
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
        """Wait for the writer, check every group was written, mark the store complete."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self.group != self.n_groups:
            raise RuntimeError(f"harvest wrote {self.group} of {self.n_groups} shard groups")
        self.manifest["complete"] = True
        self._save_manifest()

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

    def _save_manifest(self) -> None:
        """Record progress (a subclass may record it elsewhere, e.g. one file per process)."""
        write_manifest(self.root, self.manifest)

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
            if self.group >= self.n_groups:
                raise RuntimeError(f"harvest produced more than the {self.n_rows} rows planned")
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
        self.manifest["shards"].append(entry)
        self._save_manifest()
        self.group += 1
        if self.on_shard is not None:
            self.on_shard(entry["index"])


def row_metadata(corpus: TokenizedCorpus) -> dict[str, np.ndarray]:
    """Per stored row (kept positions in row-major order): token id, sequence, position, document, subset."""
    seq, pos = np.nonzero(corpus.keep_mask)
    return {
        "token_id": corpus.input_ids[seq, pos].astype(np.int32),
        "seq": seq.astype(np.int32),
        "pos": pos.astype(np.int32),
        "doc_id": corpus.doc_ids[seq, pos].astype(np.int64),
        "subset_id": corpus.subset_ids[seq, pos].astype(np.int16),
    }


def store_header(model: nn.Module, tokenizer, corpus: TokenizedCorpus, sites: list[Site], cfg: HarvestConfig) -> dict:
    """What a store's manifest says about how it was made: ``config`` (all of which must match to
    resume), site widths, token counts, subsets and tokenizer."""
    model_name = cfg.model_name or getattr(model, "name_or_path", "") or model.config.model_type
    keep = np.ascontiguousarray(corpus.keep_mask, dtype=bool)
    input_ids = np.ascontiguousarray(corpus.input_ids, dtype=np.int64)
    header = {
        "config": {
            "model": str(model_name),
            **model_fingerprints(model),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "corpus": corpus.name,
            "corpus_sha256": _fingerprint(str(input_ids.shape).encode(), input_ids.tobytes(), keep.tobytes()),
            "seq_len": int(input_ids.shape[1]),
            "sites": [s.name for s in sites],
            "dtype": cfg.dtype,
            "shard_tokens": int(cfg.shard_tokens),
        },
        "widths": {s.name: site_width(model, s) for s in sites},
        "n_tokens": int(keep.sum()),
        "n_sequences": int(input_ids.shape[0]),
        "subsets": list(corpus.subsets),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or ""),
    }
    return header


def kept_runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: the runs of consecutive True values of a flat mask, as half-open ranges."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _drop_first(runs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The runs without their first ``n`` rows."""
    out = []
    for a, b in runs:
        cut = min(n, b - a)
        n -= cut
        if a + cut < b:
            out.append((a + cut, b))
    return out


@torch.no_grad()
def _batch_rows(model, sites, input_ids_BT, keep_BT, dtype) -> tuple[dict[Site, np.ndarray], list[tuple[int, int]]]:
    """One forward; every site's rows as disk-dtype arrays, and the runs of kept rows in them.

    On a CPU the captured tensors go to the writer as they are, and it writes the kept runs
    straight from them: no gather copy in the hot loop.  On an accelerator the kept rows are
    gathered on the device first, so only they cross to the host.
    """
    device = next(model.parameters()).device
    acts = capture(model, sites, torch.as_tensor(input_ids_BT, dtype=torch.long).to(device))
    keep = keep_BT.reshape(-1)
    if device.type == "cpu":
        runs = kept_runs(keep)
        rows = {s: x.flatten(0, 1).to(dtype) for s, x in acts.items()}
    else:
        kept = torch.as_tensor(np.flatnonzero(keep)).to(device)
        runs = [(0, len(kept))]
        rows = {s: x.flatten(0, 1).index_select(0, kept).to(device="cpu", dtype=dtype) for s, x in acts.items()}
    if dtype == torch.bfloat16:
        return {s: x.view(torch.uint16).numpy() for s, x in rows.items()}, runs
    return {s: x.numpy() for s, x in rows.items()}, runs


def harvest(
    model: nn.Module,
    tokenizer,
    corpus: TokenizedCorpus,
    sites: list[Site],
    out: str | Path,
    cfg: HarvestConfig | None = None,
    *,
    on_shard: Callable[[int], None] | None = None,
) -> ActivationStore:
    """Write the activations of ``sites`` at the corpus's kept positions to a store at ``out``.

    Resumes an interrupted harvest of the same configuration; returns at once when the store is
    already complete; refuses a folder holding a different store.  ``on_shard(index)`` is called
    after each shard group is committed.  ``tokenizer`` is only recorded (the corpus is tokenized).
    """
    cfg = cfg or HarvestConfig()
    sites = check_sites(model, sites)
    check_corpus(model, corpus)
    out = Path(out)

    header = store_header(model, tokenizer, corpus, sites, cfg)
    keep = np.ascontiguousarray(corpus.keep_mask, dtype=bool)
    input_ids = np.ascontiguousarray(corpus.input_ids, dtype=np.int64)
    manifest = prepare_store(out, header, row_metadata(corpus))
    if manifest["complete"]:
        return ActivationStore(out)

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    rows_before = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])  # rows before each sequence
    done = sum(g["rows"] for g in manifest["shards"])
    first_seq = int(np.searchsorted(rows_before, done, side="right")) - 1
    first_batch = min(first_seq, len(corpus)) // cfg.batch_seqs * cfg.batch_seqs

    from tqdm.auto import tqdm

    bar = tqdm(
        total=header["n_tokens"], initial=done, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress
    )
    writer = ShardWriter(out, manifest, on_shard=on_shard, threaded=cfg.writer_thread, max_pending=cfg.max_pending)
    try:
        for start in range(first_batch, len(corpus), cfg.batch_seqs):
            stop = start + cfg.batch_seqs
            skip = max(0, done - int(rows_before[start]))  # rows of a finished group (resume only)
            n = int(rows_before[min(stop, len(corpus))] - rows_before[start]) - skip
            if n <= 0:
                continue
            arrays, runs = _batch_rows(model, sites, input_ids[start:stop], keep[start:stop], torch_dtype)
            writer.put(arrays, _drop_first(runs, skip))
            bar.update(n)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return ActivationStore(out)
