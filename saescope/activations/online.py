"""Activations straight from a live model: harvest and train in one pass, nothing on disk.

:class:`OnlineSource` is a :class:`~saescope.activations.source.BatchSource` like the store's
reader, with the same bucketed shuffle (:mod:`saescope.activations.shuffle`): each epoch the corpus's sequences are put in a
random order and grouped into buckets of about ``buffer_tokens`` kept tokens; the model runs
over a bucket (``seqs_per_forward`` sequences per forward, every site captured in that one
forward, stopping after the deepest layer needed), the rows of the bucket are permuted in memory,
and batches are cut from them.  Same seed, same batches; ``skip_batches`` skips whole buckets
without running the model on them.  Each forward is
:func:`~saescope.activations.capture.capture_kept`, the harvest's own.

A run that trains some sites for more passes than others (``kind_epochs``) says so with
``site_rows``: a later epoch then captures only the sites still read, and the rows of a site read
in more than one pass are kept from the first pass (:class:`RowCache`, on disk or in memory)
instead of recomputed — the model runs over the corpus once, whatever the epochs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saescope.activations.capture import capture_kept, check_corpus, check_sites
from saescope.activations.shuffle import Bucket, BucketedSource, group_pieces, rng
from saescope.sites import Site, data_sites, site_width
from saescope.tokens import TokenizedCorpus


class OnlineSource(BucketedSource):
    """Shuffled batches of activations computed on the fly from ``model`` over ``corpus``.

    ``device``: where the model runs (it is moved there); ``None`` keeps it where it is.
    ``buffer_tokens``: bucket size in kept tokens (default 2^18, capped at 2 GiB of float32).
    ``prefetch``: run the model for the next bucket in a background thread (worth it when the
    model and the consumer use different devices).
    ``site_rows``: ``{site: n}`` — the consumer reads ``site`` from the first ``n`` rows of the
    stream only (the trainer's steps × batch for that site's epochs); an epoch that starts at or
    past ``n`` leaves the site out.  A site missing from it is read forever.  Pair sites stand
    for the sites they read.
    ``cache_dir``: where the rows of sites read in more than one epoch are kept (an unlinked
    file per site there, freed when the process ends); ``None`` keeps them in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        corpus: TokenizedCorpus,
        sites: Iterable[Site],
        *,
        seqs_per_forward: int = 8,
        buffer_tokens: int | None = None,
        device: str | torch.device | None = None,
        prefetch: bool = False,
        site_rows: Mapping[Site, int] | None = None,
        cache_dir: str | Path | None = None,
    ):
        if device is not None:
            model.to(device)
        check_corpus(model, corpus)
        self.model = model
        self.corpus = corpus
        self.sites: list[Site] = check_sites(model, sites)
        self.d_in: dict[Site, int] = {s: site_width(model, s) for s in self.sites}
        if seqs_per_forward < 1:
            raise ValueError(f"seqs_per_forward must be >= 1, got {seqs_per_forward}")
        self.seqs_per_forward = seqs_per_forward
        self._set_buffer(buffer_tokens, prefetch)
        self._kept_per_seq = corpus.keep_mask.sum(axis=1)
        self.site_rows: dict[Site, int] = {}
        for site, n in (site_rows or {}).items():
            for s in data_sites([site]):
                self.site_rows[s] = max(self.site_rows.get(s, 0), int(n))
        epoch_rows = int(self._kept_per_seq.sum())
        reused = [s for s in self.sites if self.site_rows.get(s, 0) > epoch_rows]
        self.cache = RowCache(reused, self.d_in, self._kept_per_seq, cache_dir) if reused else None

    def close(self) -> None:
        """Free the row cache (its memory, or its files' disk space) once training is done."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def sites_at(self, epoch: int) -> list[Site]:
        """The sites an epoch's batches hold: those read at or past its first row (``site_rows``)."""
        start = epoch * int(self._kept_per_seq.sum())
        return [s for s in self.sites if s not in self.site_rows or start < self.site_rows[s]]

    @property
    def n_tokens(self) -> int:
        return self.corpus.n_tokens

    def data_identity(self) -> dict:
        """The corpus's content fingerprint, its seq_len, and the model's fingerprints."""
        from saescope.activations.harvest import model_fingerprints

        return {"corpus_sha256": self.corpus.fingerprint(), "seq_len": self.corpus.seq_len,
                **model_fingerprints(self.model)}

    def _plan(self, seed: int, epoch: int) -> list[Bucket]:
        order = rng(seed, epoch, 0).permutation(len(self.corpus))
        pieces = [(int(i), int(self._kept_per_seq[i])) for i in order if self._kept_per_seq[i] > 0]
        return group_pieces(pieces, self.buffer_tokens)

    def _load(self, bucket: Bucket, epoch: int = 0) -> dict[Site, torch.Tensor]:
        wanted = self.sites_at(epoch)
        seqs = np.asarray(bucket.pieces)
        cache = self.cache
        if cache is not None and set(wanted) <= set(cache.sites) and cache.has(seqs):
            return cache.get(seqs, wanted)  # no forward
        fill = cache is not None and not cache.has(seqs)
        run = sorted(set(wanted) | set(cache.sites)) if fill else wanted
        parts: dict[Site, list[torch.Tensor]] = {s: [] for s in wanted}
        for i in range(0, len(seqs), self.seqs_per_forward):
            batch = seqs[i : i + self.seqs_per_forward]
            rows, _ = capture_kept(self.model, run, self.corpus.input_ids[batch], self.corpus.keep_mask[batch])
            if fill:
                cache.put(batch, rows)
            for s in wanted:
                parts[s].append(rows[s])
        return {s: torch.cat(parts[s]) for s in wanted}


class RowCache:
    """Every kept row of some sites, by sequence: written by the pass that first computes a
    sequence, read by the passes after it.  ``folder``: one unlinked float32 file per site there
    (the OS pages it; nothing is left behind, even by a killed run); ``None``: in memory.
    It only saves forwards: a sequence not yet cached is computed again."""

    def __init__(self, sites: list[Site], d_in: Mapping[Site, int], kept_per_seq: np.ndarray,
                 folder: str | Path | None = None):
        self.sites = list(sites)
        self.offsets = np.concatenate([[0], np.cumsum(kept_per_seq)]).astype(np.int64)
        self.filled = np.zeros(len(kept_per_seq), dtype=bool)
        n_rows = int(self.offsets[-1])
        self._files = []
        self.rows: dict[Site, np.ndarray] = {}
        for s in self.sites:
            if folder is None:
                self.rows[s] = np.empty((n_rows, d_in[s]), dtype=np.float32)
            else:
                Path(folder).mkdir(parents=True, exist_ok=True)
                f = tempfile.TemporaryFile(dir=folder, prefix=f"saescope-rows-{s.name}-")
                self._files.append(f)
                self.rows[s] = np.memmap(f, dtype=np.float32, mode="w+", shape=(max(n_rows, 1), d_in[s]))

    def close(self) -> None:
        self.rows.clear()  # the memmaps go with their last reference
        for f in self._files:
            f.close()
        self._files.clear()

    def has(self, seqs: np.ndarray) -> bool:
        return bool(self.filled[seqs].all())

    def put(self, seqs: np.ndarray, rows: Mapping[Site, torch.Tensor]) -> None:
        """Store the kept rows of ``seqs`` (``rows[site]``: theirs, concatenated in that order)."""
        at = 0
        for i in seqs:
            a, b = self.offsets[i], self.offsets[i + 1]
            for s in self.sites:
                self.rows[s][a:b] = rows[s][at : at + b - a].numpy()
            at += b - a
        self.filled[seqs] = True

    def get(self, seqs: np.ndarray, sites: list[Site]) -> dict[Site, torch.Tensor]:
        """The kept rows of ``seqs`` at ``sites``, concatenated in ``seqs``' order."""
        return {s: torch.from_numpy(np.concatenate([self.rows[s][self.offsets[i] : self.offsets[i + 1]]
                                                    for i in seqs]))
                for s in sites}
