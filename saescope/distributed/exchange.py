"""Online training over W ranks: every rank runs the model on its own share of the corpus and each
site's activations are sent to the one rank that trains that site's SAEs.

Why this plan (``docs/distributed.md`` has the numbers): a step needs, per site, B×D activations
(4,096 × 2,304 × 4 bytes = 38 MB on Gemma 2 2B), while averaging the gradients of one SAE moves
its whole parameter set (2·D·F·4 bytes = 302 MB at 16K latents) — per SAE, per step.  Sending
activations to site owners (as sparsify's ``--distribute_modules``) therefore moves 8× less data
per 16K SAE, and a λ sweep of k SAEs on a site costs nothing more, where gradient averaging costs
k times as much.  One ``all_to_all`` per step carries every site to its owner, so every rank must
take part in every exchange: a rank whose SAEs stopped, or that has none, *serves* the batches the
trainers of the others read (:func:`saescope.train.trainer.planned_reads`).
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import torch
import torch.distributed as dist

from saescope.activations.source import BatchSource
from saescope.distributed.collectives import comm_device
from saescope.distributed.env import DistEnv, collective, current, maybe_inject_failure
from saescope.sites import Site


class OwnerExchange:
    """The batches this rank's SAEs need, assembled from every rank's own activations.

    ``local`` yields this rank's activations of *every* site (B/W rows per step, e.g. an
    :class:`~saescope.activations.online.OnlineSource` over the rank's share of the corpus).  Each step one
    ``all_to_all`` sends each site's rows to the rank that ``owners`` names; the rank gets, for
    each site it owns, the W slices in rank order: B rows.  A BatchSource over the owned sites.
    """

    def __init__(self, local: BatchSource, owners: dict[Site, int], env: DistEnv | None = None):
        self.local, self.owners, self.env = local, dict(owners), env or current()
        missing = sorted(set(owners) - set(local.sites))
        if missing:
            raise ValueError(f"the local source has no activations for {', '.join(map(str, missing))}")
        self.sites: list[Site] = sorted(s for s, o in owners.items() if o == self.env.rank)
        self.d_in: dict[Site, int] = {s: local.d_in[s] for s in self.sites}
        self.model_name = getattr(local, "model_name", None)
        self._by_owner = [sorted(s for s, o in owners.items() if o == r) for r in range(self.env.world_size)]
        self.bytes_sent = 0
        #: the batch the most recently opened iteration yields next (see :meth:`serve`)
        self.next_batch = 0

    def iter_batches(self, batch_size: int, *, seed: int = 0, skip_batches: int = 0):
        W = self.env.world_size
        if batch_size % W:
            raise ValueError(f"batch size {batch_size} is not divisible by the {W} ranks")
        self.next_batch = skip_batches
        return self._iterate(batch_size // W, seed, skip_batches)

    def _iterate(self, b: int, seed: int, skip_batches: int):
        for i, local in enumerate(self.local.iter_batches(b, seed=seed, skip_batches=skip_batches), start=skip_batches):
            maybe_inject_failure(i, "batch", self.env)
            out = self._exchange(local, b, i)
            self.next_batch = i + 1
            yield out

    def _exchange(self, local: dict[Site, torch.Tensor], b: int, step: int) -> dict[Site, torch.Tensor]:
        W = self.env.world_size
        if W == 1:
            return {s: local[s] for s in self.sites}
        device = comm_device()
        widths = self.local.d_in
        send = torch.cat([local[s].reshape(-1) for group in self._by_owner for s in group]).to(device)
        sizes = [b * sum(widths[s] for s in group) for group in self._by_owner]
        mine = sizes[self.env.rank]
        recv = torch.empty(W * mine, dtype=send.dtype, device=device)
        with collective(f"step {step}: sending activations to the ranks that own their sites", self.env):
            dist.all_to_all_single(recv, send, output_split_sizes=[mine] * W, input_split_sizes=sizes)
        self.bytes_sent += (send.numel() - sizes[self.env.rank]) * send.element_size()
        by_rank, out, at = recv.view(W, mine), {}, 0
        for s in self.sites:
            n = b * widths[s]
            out[s] = by_rank[:, at : at + n].reshape(W * b, widths[s])
            at += n
        return out

    def serve(self, start: int, stop: int, *, batch_size: int, seed: int = 0) -> None:
        """Take part in the exchanges of batches ``[start, stop)`` without training on them: a rank
        whose SAEs all stopped (or that has none) must still send its rows to the others."""
        if stop > start:
            for _ in islice(self.iter_batches(batch_size, seed=seed, skip_batches=start), stop - start):
                pass


def corpus_share(corpus, rank: int, world_size: int):
    """Sequences ``rank, rank + W, …`` of a :class:`~saescope.tokens.TokenizedCorpus`."""
    if len(corpus) < world_size:
        raise ValueError(f"corpus {corpus.name!r} has {len(corpus)} sequences, fewer than the {world_size} ranks")
    pick = slice(rank, None, world_size)
    return replace(corpus, input_ids=corpus.input_ids[pick], doc_ids=corpus.doc_ids[pick],
                   subset_ids=corpus.subset_ids[pick], keep_mask=corpus.keep_mask[pick])
