"""Harvest: run a model over a tokenized corpus and write every requested site's activations
to an activation store (:mod:`saescope.activations.store` describes the layout and its crash
safety).  One path for any number of processes: a single process is the one-rank case.

The store's unit of work is the shard group (rows ``[g·S, (g+1)·S)`` of every site, S =
``shard_tokens``).  The groups still to write are dealt to the ranks in contiguous blocks; each
rank runs the model over the sequences covering its block — in the *same* batches of
``batch_seqs`` sequences whatever the number of ranks, so its files are byte-identical to a
single-process harvest's — and hands the captured rows to a
:class:`~saescope.activations.writer.ShardWriter`, which writes the runs of kept positions (BOS,
EOS and padding skipped) straight from them, hashes them, and records each finished group (in the
manifest with one process, in the rank's part file with several: :mod:`saescope.activations.writer`).
The writer runs in a background thread, so disk writes and SHA-256 overlap the next forward
(``HarvestConfig.writer_thread=False`` writes inline).  Memory: one batch of activations, plus at
most ``max_pending`` batches queued for the writer.

Rank 0 alone touches ``manifest.json`` across ranks: before the others start it creates (or
checks) the store and folds in the part files of any earlier launch; after a barrier at the end
it folds in the new parts and marks the store complete.  A killed rank's groups are either
recorded (kept) or not (dealt out again at the relaunch, which may use any number of ranks).
Resuming restarts at the batch holding the first row of the first unfinished group, so a
resumed store is byte-identical to an uninterrupted one (on the same device and batch size).
With several ranks, the output folder must be on a filesystem every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saescope.activations.capture import capture_kept, check_corpus, check_sites
from saescope.activations.store import DISK_DTYPES, ActivationStore, config_differs, prepare_store, read_manifest, write_manifest
from saescope.activations.writer import PARTS, PENDING, ShardWriter, fold_into_manifest, part_recorder, read_entries
from saescope.distributed.collectives import barrier
from saescope.distributed.env import DistEnv, current, maybe_inject_failure
from saescope.locks import folder_lock
from saescope.sites import Site, site_width
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
    input_ids = corpus.input_ids
    header = {
        "config": {
            "model": str(model_name),
            **model_fingerprints(model),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "corpus": corpus.name,
            "corpus_sha256": corpus.fingerprint(),
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


def _as_disk_arrays(rows: dict[Site, torch.Tensor]) -> dict[Site, np.ndarray]:
    """Captured rows as numpy arrays in the disk dtype (bfloat16 as its uint16 bit pattern)."""
    return {s: (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy() for s, x in rows.items()}


def _write_groups(model, sites, corpus: TokenizedCorpus, rows_before: np.ndarray, writer: ShardWriter,
                  manifest: dict, first: int, end: int, cfg: HarvestConfig, bar) -> None:
    """Write groups ``[first, end)``: forwards in the single-process batch boundaries."""
    S, n_rows, n_seqs = manifest["config"]["shard_tokens"], manifest["n_tokens"], len(corpus)
    lo, hi = first * S, min(end * S, n_rows)
    first_seq = int(np.searchsorted(rows_before, lo, side="right")) - 1
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[manifest["config"]["dtype"]]
    input_ids = np.ascontiguousarray(corpus.input_ids, dtype=np.int64)
    keep = np.ascontiguousarray(corpus.keep_mask, dtype=bool)
    try:
        for start in range(first_seq // cfg.batch_seqs * cfg.batch_seqs, n_seqs, cfg.batch_seqs):
            if rows_before[start] >= hi:
                break
            stop = min(start + cfg.batch_seqs, n_seqs)
            a, b = max(lo, int(rows_before[start])), min(hi, int(rows_before[stop]))
            if a >= b:
                continue
            rows, runs = capture_kept(model, sites, input_ids[start:stop], keep[start:stop], dtype, gather=False)
            writer.put(_as_disk_arrays(rows), _clip(runs, a - int(rows_before[start]), b - int(rows_before[start])))
            bar.update(b - a)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def harvest(
    model: nn.Module,
    tokenizer,
    corpus: TokenizedCorpus,
    sites: list[Site],
    out: str | Path,
    cfg: HarvestConfig | None = None,
    *,
    on_shard: Callable[[int], None] | None = None,
    env: DistEnv | None = None,
) -> ActivationStore:
    """Write the activations of ``sites`` at the corpus's kept positions to a store at ``out``.

    Under torchrun every rank calls it with the same model, corpus, sites and ``cfg`` (``env``:
    default the current process group) and writes its share of the groups.  Resumes an
    interrupted harvest of the same configuration; returns at once when the store is already
    complete; refuses a folder holding a different store.  ``on_shard(index)`` is called after
    each shard group is recorded.  ``tokenizer`` is only recorded (the corpus is tokenized).
    """
    env = env or current()
    if env.is_main:  # rank 0 alone cleans up and writes the manifest: one harvest per folder
        with folder_lock(out, "activation store"):
            return _harvest(model, tokenizer, corpus, sites, Path(out), cfg, on_shard, env)
    return _harvest(model, tokenizer, corpus, sites, Path(out), cfg, on_shard, env)


def _harvest(model, tokenizer, corpus, sites, out: Path, cfg, on_shard, env) -> ActivationStore:
    cfg = cfg or HarvestConfig()
    sites = check_sites(model, sites)
    check_corpus(model, corpus)
    out = Path(out)
    header = store_header(model, tokenizer, corpus, sites, cfg)
    if env.is_main:
        manifest = prepare_store(out, header, row_metadata(corpus))
        if not manifest["complete"]:
            fold_into_manifest(out, manifest)
    barrier("waiting for rank 0 to prepare the activation store")
    manifest = read_manifest(out)
    differ = sorted(k for k, v in header["config"].items() if config_differs(k, manifest["config"].get(k), v))
    if differ:
        raise ValueError(f"{env}: this rank's {', '.join(differ)} differ from the store rank 0 prepared in {out}: "
                         "every rank must harvest the same model, corpus and sites")
    if manifest["complete"]:
        return ActivationStore(out)

    S = manifest["config"]["shard_tokens"]
    n_groups = -(-manifest["n_tokens"] // S)
    done = {g["index"] for g in manifest["shards"]} | {g["index"] for g in read_entries(out / PARTS / PENDING)}
    mine = share([g for g in range(n_groups) if g not in done], env.rank, env.world_size)
    keep = np.ascontiguousarray(corpus.keep_mask, dtype=bool)
    rows_before = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])  # rows before each sequence
    earlier: list[dict] = []  # groups this rank finished in earlier runs of this launch
    part = out / PARTS / f"rank_{env.rank}.json"

    def after_group(index: int) -> None:
        maybe_inject_failure(index, "shard", env)  # tests: a rank dies here
        if on_shard is not None:
            on_shard(index)

    from tqdm.auto import tqdm

    total = sum(min(S, manifest["n_tokens"] - g * S) for g in mine)
    desc = "harvest" if not env.distributed else f"harvest (rank {env.rank})"
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not (cfg.progress and env.is_main)) as bar:
        for first, end in _runs(mine):
            if env.distributed:
                part.parent.mkdir(exist_ok=True)
                record = part_recorder(part, list(earlier))
            else:  # one process: the manifest itself records each group
                record = lambda written: fold_into_manifest(out, manifest, written)  # noqa: E731
            writer = ShardWriter(out, manifest, first, end, record, on_shard=after_group,
                                 threaded=cfg.writer_thread, max_pending=cfg.max_pending)
            _write_groups(model, sites, corpus, rows_before, writer, manifest, first, end, cfg, bar)
            earlier.extend(writer.written)
    barrier("waiting for every rank to finish its shard groups", patient=True)
    if env.is_main:
        manifest = read_manifest(out)
        finished = fold_into_manifest(out, manifest)
        missing = sorted(set(range(n_groups)) - finished)
        if missing:
            raise RuntimeError(f"harvest of {out} lacks shard groups {missing[:8]} after every rank finished; "
                               "relaunch the same command to write them")
        shutil.rmtree(out / PARTS, ignore_errors=True)
        manifest["complete"] = True
        write_manifest(out, manifest)
    barrier("waiting for rank 0 to complete the store manifest")
    return ActivationStore(out)
