"""Bucketed shuffling: the one batching scheme behind every batch source (store, online, in memory).

The paper shuffles activations "in buckets of about 10^6".  All our sources do the same:

* an *epoch* is the whole dataset once, cut into *buckets* of at most ``buffer_tokens`` rows
  (the order of the pieces that make up the buckets is itself random per epoch);
* each bucket is loaded whole, its rows are permuted, and the permuted rows are appended to one
  endless stream (epoch after epoch);
* batch ``i`` is rows ``[i*B, (i+1)*B)`` of that stream.

Memory is one bucket (two with ``prefetch``) plus one batch, whatever the dataset's size.  Every
random choice comes from ``numpy.random.default_rng`` seeded by ``(seed, epoch, …)``, so the
stream is a pure function of the seed; and because a bucket's row count is known before it is
loaded, :func:`shuffled_batches` skips ``skip_batches`` batches without loading the buckets it
skips — a resumed trainer gets exactly the batches it would have seen.

All sites of a batch share one row permutation: row ``r`` of every site's tensor comes from the
same token.  That keeps batches token-aligned across sites (useful for cross-site analyses) and
costs nothing in shuffle quality for the per-site SAEs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: default bucket: 2^18 tokens, or this many bytes of float32 over all sites, whichever is smaller
DEFAULT_BUFFER_TOKENS = 2**18
DEFAULT_BUFFER_BYTES = 2 << 30


def default_buffer_tokens(total_width: int) -> int:
    """2^18 tokens, capped so one bucket of all sites' float32 rows stays under 2 GiB."""
    return max(1, min(DEFAULT_BUFFER_TOKENS, DEFAULT_BUFFER_BYTES // (4 * max(1, total_width))))


def rng(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (e.g. seed, epoch, bucket)."""
    return np.random.default_rng([int(k) for k in key])


@dataclass(frozen=True)
class Bucket:
    """Some pieces of the dataset (opaque to this module) that are loaded and shuffled together."""

    pieces: tuple[Any, ...]
    rows: int


def group_pieces(pieces: Sequence[tuple[Any, int]], buffer_tokens: int) -> list[Bucket]:
    """Cut ``(piece, rows)`` pairs, in order, into buckets of at most ``buffer_tokens`` rows
    (a single piece larger than that makes a bucket on its own)."""
    buckets: list[Bucket] = []
    current: list[Any] = []
    rows = 0
    for piece, n in pieces:
        if current and rows + n > buffer_tokens:
            buckets.append(Bucket(tuple(current), rows))
            current, rows = [], 0
        current.append(piece)
        rows += n
    if current:
        buckets.append(Bucket(tuple(current), rows))
    return buckets


#: a bucket is this many chunks (store reader, in-memory source): pieces from all over the data
CHUNKS_PER_BUCKET = 16


def chunks(group_rows: Sequence[int], buffer_tokens: int, max_chunk: int | None = None) -> list[tuple[tuple[int, int, int], int]]:
    """Cut groups of rows (a store's shard groups, or one in-memory tensor) into chunks of
    ``buffer_tokens // 16`` rows (at most ``max_chunk``): ``((group, start, stop), rows)`` pieces."""
    size = max(1, buffer_tokens // CHUNKS_PER_BUCKET)
    if max_chunk is not None:
        size = min(size, max_chunk)
    return [((g, a, min(a + size, rows)), min(a + size, rows) - a)
            for g, rows in enumerate(group_rows) for a in range(0, rows, size)]


def chunk_plan(pieces: Sequence[tuple[Any, int]], seed: int, epoch: int, buffer_tokens: int) -> list[Bucket]:
    """An epoch's buckets: the chunks in a random order (seed, epoch), 16 to a bucket."""
    order = rng(seed, epoch, 0).permutation(len(pieces))
    return group_pieces([pieces[i] for i in order], buffer_tokens)


def shuffled_batches(
    plan: Callable[[int], list[Bucket]],
    load: Callable[[Bucket], dict[Any, torch.Tensor]],
    batch_size: int,
    *,
    seed: int = 0,
    skip_batches: int = 0,
    prefetch: bool = False,
) -> Iterator[dict[Any, torch.Tensor]]:
    """Yield ``{key: x_BD}`` batches forever from buckets.

    ``plan(epoch)`` lists the epoch's buckets (deterministic, cheap: no data read);
    ``load(bucket, epoch)`` returns the bucket's rows in piece order, ``{key: (bucket.rows, D)}``
    (a source may leave out, in later epochs, keys its consumer no longer reads).
    With ``prefetch`` the next bucket loads in a background thread while batches are consumed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    epoch_rows = sum(b.rows for b in plan(0))
    if epoch_rows == 0:
        raise ValueError("no rows to draw batches from")
    first_epoch, first_skip = divmod(skip_batches * batch_size, epoch_rows)

    def work() -> Iterator[tuple[int, int, Bucket, int]]:
        """(epoch, index, bucket, rows to skip at its start) for every bucket still needed."""
        epoch, skip_rows = first_epoch, first_skip
        while True:
            for j, bucket in enumerate(plan(epoch)):
                if skip_rows >= bucket.rows:
                    skip_rows -= bucket.rows
                    continue
                yield epoch, j, bucket, skip_rows
                skip_rows = 0
            epoch += 1

    def permuted(item: tuple[int, int, Bucket, int]) -> dict[Any, torch.Tensor]:
        e, j, bucket, skip = item
        perm = rng(seed, e, 1, j).permutation(bucket.rows)[skip:]
        order = torch.from_numpy(perm)
        return {k: x.index_select(0, order) for k, x in load(bucket, e).items()}

    items = work()
    carry: dict[Any, torch.Tensor] | None = None
    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    try:
        pending = pool.submit(permuted, next(items)) if pool else None
        while True:
            if pool:
                data = pending.result()
                pending = pool.submit(permuted, next(items))
            else:
                data = permuted(next(items))
            n = next(iter(data.values())).shape[0]
            at = 0
            if carry is not None:  # finish the batch left over from the previous bucket
                have = next(iter(carry.values())).shape[0]
                at = min(batch_size - have, n)
                carry = {k: torch.cat([carry[k], x[:at]]) for k, x in data.items()}  # keys: this epoch's
                if have + at < batch_size:
                    continue
                yield carry
                carry = None
            while at + batch_size <= n:
                yield {k: x[at : at + batch_size] for k, x in data.items()}
                at += batch_size
            if at < n:
                carry = {k: x[at:].clone() for k, x in data.items()}
    finally:
        if pool:
            pool.shutdown(wait=False)  # a bucket being prefetched finishes loading, then is dropped


class BucketedSource:
    """Mixin for sources that cut their data into buckets: subclasses define ``_plan(seed,
    epoch) -> list[Bucket]``, ``_load(bucket, epoch) -> {site: rows}`` and ``prefetch``; this gives them
    :meth:`iter_batches`, the :class:`~saescope.activations.source.BatchSource` method."""

    prefetch: bool = False

    def _set_buffer(self, buffer_tokens: int | None, prefetch: bool) -> None:
        """``buffer_tokens`` (default: :func:`default_buffer_tokens` of ``self.d_in``) and ``prefetch``."""
        if buffer_tokens is None:
            buffer_tokens = default_buffer_tokens(sum(self.d_in.values()))
        if buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be >= 1, got {buffer_tokens}")
        self.buffer_tokens = buffer_tokens
        self.prefetch = prefetch

    def iter_batches(self, batch_size: int, *, seed: int = 0, skip_batches: int = 0):
        """Yield ``{site: x_BD}`` float32 CPU batches forever, deterministic in ``seed``."""
        return shuffled_batches(
            lambda epoch: self._plan(seed, epoch),
            self._load,
            batch_size,
            seed=seed,
            skip_batches=skip_batches,
            prefetch=self.prefetch,
        )
