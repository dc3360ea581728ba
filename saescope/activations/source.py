"""The one interface between where activations come from and the trainer, and the source over
activations already in memory.

The on-disk store's shuffled reader (:mod:`saescope.activations.store`), the online stream from
a live model (:mod:`saescope.activations.online`) and :class:`InMemorySource` are each a
:class:`BatchSource`.  The trainer only ever sees this protocol, so "harvest then train" and
"harvest and train in one pass" share every line of it.

A source yields, per step, one float32 batch per site: ``{site: x_BD}`` with the *same*
``batch_size`` rows for every site.  Iteration is deterministic for a given ``seed`` and can
start at any step (``skip_batches``), which is what makes a resumed run bit-identical to an
uninterrupted one.  Sources loop over their data (epochs, reshuffled per epoch) until the
consumer stops; all three shuffle the same way (:mod:`saescope.activations.shuffle`).
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import hashlib

import torch

from saescope.activations.shuffle import Bucket, BucketedSource, chunk_plan, chunks
from saescope.sites import Site


@runtime_checkable
class BatchSource(Protocol):
    #: the sites this source yields, sorted
    sites: list[Site]
    #: width of each site's activations
    d_in: dict[Site, int]

    def iter_batches(
        self, batch_size: int, *, seed: int = 0, skip_batches: int = 0
    ) -> Iterator[dict[Site, torch.Tensor]]:
        """Yield ``{site: x_BD}`` float32 CPU tensors forever (epochs loop), deterministically."""
        ...


def data_identity(source) -> dict | None:
    """What a source's data are, for a training run's identity (``checkpoints/run.json``): its
    ``data_identity()`` (content fingerprints: store, corpus, seq_len, model weights), or None for
    a source that cannot tell (a wrapper, a test double), which then only matches itself."""
    method = getattr(source, "data_identity", None)
    return method() if callable(method) else None


class InMemorySource(BucketedSource):
    """Batches drawn from ``{site: x_ND}`` tensors that all hold the same N rows (tokens).

    For notebooks ("I have a tensor of activations, train SAEs on it") and for tests.  Row i of
    every site belongs to the same token, so one permutation serves all sites.  The rows are cut
    into chunks and shuffled in buckets of ``buffer_tokens`` exactly as the store reader does,
    so an epoch's tail carries into the next epoch instead of being dropped.
    """

    def __init__(self, tensors: dict[Site, torch.Tensor], *, buffer_tokens: int | None = None):
        if not tensors:
            raise ValueError("InMemorySource needs at least one site")
        n_rows = {t.shape[0] for t in tensors.values()}
        if len(n_rows) != 1:
            raise ValueError(f"every site needs the same number of rows, got {sorted(n_rows)}")
        for site, t in tensors.items():
            if t.ndim != 2:
                raise ValueError(f"{site}: expected a 2-D (tokens, d_in) tensor, got shape {tuple(t.shape)}")
        self._tensors = {site: t.detach().to("cpu", torch.float32) for site, t in tensors.items()}
        self.sites: list[Site] = sorted(self._tensors)
        self.d_in: dict[Site, int] = {site: t.shape[1] for site, t in self._tensors.items()}
        self.n_tokens: int = n_rows.pop()
        self._set_buffer(buffer_tokens, prefetch=False)
        self._chunks = chunks([self.n_tokens], self.buffer_tokens)

    def data_identity(self) -> dict:
        """SHA-256 of every site's rows (a resume on other tensors is refused)."""
        h = hashlib.sha256()
        for site in self.sites:
            h.update(site.name.encode())
            h.update(self._tensors[site].contiguous().numpy().tobytes())
        return {"tensors_sha256": h.hexdigest()[:16], "n_tokens": self.n_tokens}

    def iter_batches(self, batch_size: int, *, seed: int = 0, skip_batches: int = 0):
        if batch_size > self.n_tokens:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n_tokens} tokens held in memory")
        return super().iter_batches(batch_size, seed=seed, skip_batches=skip_batches)

    def _plan(self, seed: int, epoch: int) -> list[Bucket]:
        return chunk_plan(self._chunks, seed, epoch, self.buffer_tokens)

    def _load(self, bucket: Bucket, epoch: int = 0) -> dict[Site, torch.Tensor]:
        return {site: torch.cat([t[a:b] for _, a, b in bucket.pieces]) for site, t in self._tensors.items()}
