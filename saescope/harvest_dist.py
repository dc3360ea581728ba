"""Data-parallel harvest: W ranks (torchrun) fill one activation store together.

The store's unit of work is the shard group (rows ``[g·S, (g+1)·S)`` of every site, S =
``shard_tokens``).  The groups still to write are dealt to the ranks in contiguous blocks; each
rank runs the model over the sequences covering its block — in the *same* batches of
``batch_seqs`` sequences a single process uses, so its files are byte-identical to a
single-process harvest's — and writes its groups with the ordinary atomic shard writer.  Instead
of the shared ``manifest.json`` a rank records each finished group in its own part file
(``.harvest_parts/rank_<r>.json``, replaced atomically), so no two processes ever write one file.

Rank 0 alone touches ``manifest.json``: before the others start it creates (or checks) the store
and folds the part files of any earlier launch into it; after a barrier at the end it folds in
the new parts and marks the store complete.  The manifest only ever lists a gap-free prefix of
groups (what :func:`saescope.harvest.harvest` expects, so a single process can resume a
distributed harvest and vice versa); finished groups beyond a gap wait in
``.harvest_parts/pending.json``.  A killed rank's groups are thus either in a part file (kept)
or not (dealt out again at the relaunch, which may use any number of ranks).

The output folder must be on a filesystem every rank sees (one node, or NFS/Lustre/GCS-fuse).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saescope.harvest import (
    HarvestConfig,
    ShardWriter,
    _batch_rows,
    row_metadata,
    store_header,
)
from saescope.sites import Site
from saescope.store import (
    ActivationStore,
    prepare_store,
    read_manifest,
    write_atomic,
    write_manifest,
)
from saescope.stream import check_corpus, check_sites
from saescope.tokens import TokenizedCorpus
from saescope.train.distributed import DistEnv, barrier, current, maybe_inject_failure

PARTS = ".harvest_parts"
PENDING = "pending.json"


def _read_entries(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return []  # cannot happen for a file written atomically; a stray file adds nothing


def fold_parts(root: Path, manifest: dict) -> set[int]:
    """Rank 0: merge every part file into the manifest's gap-free prefix of groups, keep the rest in
    ``pending.json``, delete the rank part files.  Returns the indices of every finished group."""
    parts = Path(root) / PARTS
    entries = {g["index"]: g for g in manifest["shards"]}
    files = sorted(parts.glob("*.json")) if parts.exists() else []
    for path in files:
        for g in _read_entries(path):
            entries.setdefault(g["index"], g)
    prefix = []
    while len(prefix) in entries:
        prefix.append(entries.pop(len(prefix)))
    manifest["shards"] = prefix
    write_manifest(Path(root), manifest)
    if entries or files:
        parts.mkdir(exist_ok=True)
        write_atomic(parts / PENDING, json.dumps({"shards": [entries[i] for i in sorted(entries)]}).encode())
    for path in files:
        if path.name != PENDING:
            path.unlink()
    return {g["index"] for g in prefix} | set(entries)


def share(todo: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous block of the groups ``todo`` (sizes differ by at most one)."""
    n = len(todo)
    return todo[rank * n // world_size : (rank + 1) * n // world_size]


def _runs(groups: list[int]) -> list[tuple[int, int]]:
    """Consecutive indices as half-open ranges: [3, 4, 5, 9] -> [(3, 6), (9, 10)]."""
    runs: list[tuple[int, int]] = []
    for g in groups:
        if runs and runs[-1][1] == g:
            runs[-1] = (runs[-1][0], g + 1)
        else:
            runs.append((g, g + 1))
    return runs


def _clip(runs: list[tuple[int, int]], first: int, stop: int) -> list[tuple[int, int]]:
    """The parts of ``runs`` (ranges of array rows, in order) that are kept rows ``[first, stop)``,
    counting kept rows from 0 across the runs."""
    out, seen = [], 0
    for a, b in runs:
        lo, hi = max(first - seen, 0), min(stop - seen, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        seen += b - a
    return out


class _PartWriter(ShardWriter):
    """The shard writer for groups ``[first, end)``, recording them in this rank's part file."""

    def __init__(self, root: Path, manifest: dict, part: Path, earlier: list[dict], first: int, end: int,
                 cfg: HarvestConfig, env: DistEnv):
        on_shard = lambda index: maybe_inject_failure(index, "shard", env)  # tests: a rank dies here
        super().__init__(root, {**manifest, "shards": []}, on_shard=on_shard, threaded=cfg.writer_thread,
                         max_pending=cfg.max_pending)
        self.group, self.n_groups = first, end  # set before any row is queued
        self.part, self.earlier = part, earlier

    def _save_manifest(self) -> None:
        write_atomic(self.part, json.dumps({"shards": self.earlier + self.manifest["shards"]}).encode())


def _harvest_run(model, sites, input_ids, keep, rows_before, root, manifest, part, earlier, first, end, cfg, bar,
                 env) -> None:
    """Write groups ``[first, end)``: forwards in the single-process batch boundaries."""
    S, n_rows, n_seqs = manifest["config"]["shard_tokens"], manifest["n_tokens"], len(input_ids)
    lo, hi = first * S, min(end * S, n_rows)
    first_seq = int(np.searchsorted(rows_before, lo, side="right")) - 1
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[manifest["config"]["dtype"]]
    writer = _PartWriter(root, manifest, part, earlier, first, end, cfg, env)
    try:
        for start in range(first_seq // cfg.batch_seqs * cfg.batch_seqs, n_seqs, cfg.batch_seqs):
            if rows_before[start] >= hi:
                break
            stop = min(start + cfg.batch_seqs, n_seqs)
            a, b = max(lo, int(rows_before[start])), min(hi, int(rows_before[stop]))
            if a >= b:
                continue
            arrays, runs = _batch_rows(model, sites, input_ids[start:stop], keep[start:stop], dtype)
            writer.put(arrays, _clip(runs, a - int(rows_before[start]), b - int(rows_before[start])))
            bar.update(b - a)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    earlier.extend(writer.manifest["shards"])


def harvest_distributed(model: nn.Module, tokenizer, corpus: TokenizedCorpus, sites: list[Site], out: str | Path,
                        cfg: HarvestConfig | None = None, *, env: DistEnv | None = None) -> ActivationStore:
    """:func:`saescope.harvest.harvest` over the ranks of ``env`` (default: the current process
    group).  Every rank must call it with the same model, corpus, sites and ``cfg``; each runs the
    model on its own device.  With one process it is a plain harvest.  Returns the complete store."""
    env = env or current()
    cfg = cfg or HarvestConfig()
    sites = check_sites(model, sites)
    check_corpus(model, corpus)
    out = Path(out)
    header = store_header(model, tokenizer, corpus, sites, cfg)
    if env.is_main:
        manifest = prepare_store(out, header, row_metadata(corpus))
        if not manifest["complete"]:
            fold_parts(out, manifest)
    barrier("waiting for rank 0 to prepare the activation store")
    manifest = read_manifest(out)
    differ = sorted(k for k, v in header["config"].items() if manifest["config"].get(k) != v)
    if differ:
        raise ValueError(f"{env}: this rank's {', '.join(differ)} differ from the store rank 0 prepared in {out}: "
                         "every rank must harvest the same model, corpus and sites")
    if not manifest["complete"]:
        n_groups = -(-manifest["n_tokens"] // manifest["config"]["shard_tokens"])
        done = {g["index"] for g in manifest["shards"]} | {g["index"] for g in _read_entries(out / PARTS / PENDING)}
        mine = share([g for g in range(n_groups) if g not in done], env.rank, env.world_size)
        keep = np.ascontiguousarray(corpus.keep_mask, dtype=bool)
        input_ids = np.ascontiguousarray(corpus.input_ids, dtype=np.int64)
        rows_before = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
        part, earlier = out / PARTS / f"rank_{env.rank}.json", []
        part.parent.mkdir(exist_ok=True)
        from tqdm.auto import tqdm

        S = manifest["config"]["shard_tokens"]
        total = sum(min(S, manifest["n_tokens"] - g * S) for g in mine)
        with tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest (rank {env.rank})",
                  disable=not (cfg.progress and env.is_main)) as bar:
            for first, end in _runs(mine):
                _harvest_run(model, sites, input_ids, keep, rows_before, out, manifest, part, earlier,
                             first, end, cfg, bar, env)
        barrier("waiting for every rank to finish its shard groups", patient=True)
        if env.is_main:
            manifest = read_manifest(out)
            finished = fold_parts(out, manifest)
            missing = sorted(set(range(n_groups)) - finished)
            if missing:
                raise RuntimeError(f"distributed harvest of {out} lacks shard groups {missing[:8]} after every "
                                   "rank finished; relaunch the same command to write them")
            shutil.rmtree(out / PARTS, ignore_errors=True)
            manifest["complete"] = True
            write_manifest(out, manifest)
    barrier("waiting for rank 0 to complete the store manifest")
    return ActivationStore(out)
