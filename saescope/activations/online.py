"""Activations straight from a live model: harvest and train in one pass, nothing on disk.

:class:`OnlineSource` is a :class:`~saescope.activations.source.BatchSource` like the store's
reader, with the same bucketed shuffle (:mod:`saescope.activations.shuffle`): each epoch the corpus's sequences are put in a
random order and grouped into buckets of about ``buffer_tokens`` kept tokens; the model runs
over a bucket (``seqs_per_forward`` sequences per forward, every site captured in that one
forward, stopping after the deepest layer needed), the rows of the bucket are permuted in memory,
and batches are cut from them.  Same seed, same batches; ``skip_batches`` skips whole buckets
without running the model on them.  Each forward is
:func:`~saescope.activations.capture.capture_kept`, the harvest's own.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from saescope.activations.capture import capture_kept, check_corpus, check_sites
from saescope.activations.shuffle import Bucket, BucketedSource, group_pieces, rng
from saescope.sites import Site, site_width
from saescope.tokens import TokenizedCorpus


class OnlineSource(BucketedSource):
    """Shuffled batches of activations computed on the fly from ``model`` over ``corpus``.

    ``device``: where the model runs (it is moved there); ``None`` keeps it where it is.
    ``buffer_tokens``: bucket size in kept tokens (default 2^18, capped at 2 GiB of float32).
    ``prefetch``: run the model for the next bucket in a background thread (worth it when the
    model and the consumer use different devices).
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

    def _load(self, bucket: Bucket) -> dict[Site, torch.Tensor]:
        parts: dict[Site, list[torch.Tensor]] = {s: [] for s in self.sites}
        seqs = np.asarray(bucket.pieces)
        for i in range(0, len(seqs), self.seqs_per_forward):
            batch = seqs[i : i + self.seqs_per_forward]
            rows, _ = capture_kept(self.model, self.sites, self.corpus.input_ids[batch], self.corpus.keep_mask[batch])
            for s in self.sites:
                parts[s].append(rows[s])
        return {s: torch.cat(parts[s]) for s in self.sites}
