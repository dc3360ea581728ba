"""Activations straight from a live model: harvest and train in one pass, nothing on disk.

:class:`OnlineSource` is a :class:`saescope.batches.BatchSource` like the store's reader, with the
same bucketed shuffle (:mod:`saescope.shuffle`): each epoch the corpus's sequences are put in a
random order and grouped into buckets of about ``buffer_tokens`` kept tokens; the model runs
over a bucket (``seqs_per_forward`` sequences per forward, every site captured in that one
forward, stopping after the deepest layer needed), the rows of the bucket are permuted in memory,
and batches are cut from them.  Same seed, same batches; ``skip_batches`` skips whole buckets
without running the model on them.

:func:`capture_kept` does one forward for every site and keeps only the positions the corpus
keeps (no BOS, EOS or padding).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from saescope.shuffle import (
    Bucket,
    BucketedSource,
    default_buffer_tokens,
    group_pieces,
    rng,
)
from saescope.sites import Site, capture, n_layers, site_width
from saescope.tokens import TokenizedCorpus


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_corpus(model: nn.Module, corpus: TokenizedCorpus) -> None:
    """Refuse a corpus the model cannot run on, with a message naming the problem."""
    if len(corpus) == 0 or corpus.n_tokens == 0:
        raise ValueError(f"corpus {corpus.name!r} is empty: it has no token to take activations from")
    seq_len = corpus.input_ids.shape[1]
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise ValueError(f"sequence length {seq_len} is beyond the model's context of {context} tokens")
    vocab = getattr(model.config, "vocab_size", None)
    top = int(corpus.input_ids.max())
    if vocab is not None and top >= vocab:
        raise ValueError(
            f"corpus {corpus.name!r} holds token id {top}, outside the model's vocabulary of {vocab}: "
            "was it tokenized with another model's tokenizer?"
        )


def check_sites(model: nn.Module, sites: Iterable[Site]) -> list[Site]:
    sites = sorted(set(sites))
    if not sites:
        raise ValueError("no site requested")
    layers = n_layers(model)
    for site in sites:
        if site.layer >= layers:
            raise ValueError(f"site {site} out of range: the model has {layers} layers")
    return sites


@torch.no_grad()
def capture_kept(
    model: nn.Module,
    sites: list[Site],
    input_ids_BT: np.ndarray,
    keep_BT: np.ndarray,
    dtype: torch.dtype = torch.float32,
) -> dict[Site, torch.Tensor]:
    """One forward over a batch of sequences; each site's rows at kept positions, ``(n_kept, D)``,
    in ``dtype`` on the CPU, in row-major (sequence, position) order."""
    device = model_device(model)
    input_ids = torch.as_tensor(input_ids_BT, dtype=torch.long).to(device)
    kept = torch.as_tensor(keep_BT).reshape(-1).nonzero().squeeze(1).to(device)
    acts = capture(model, sites, input_ids)
    return {s: acts[s].flatten(0, 1).index_select(0, kept).to(device="cpu", dtype=dtype) for s in sites}


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
        if buffer_tokens is None:
            buffer_tokens = default_buffer_tokens(sum(self.d_in.values()))
        if buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be >= 1, got {buffer_tokens}")
        self.buffer_tokens = buffer_tokens
        self.prefetch = prefetch
        self._kept_per_seq = corpus.keep_mask.sum(axis=1)

    @property
    def n_tokens(self) -> int:
        return self.corpus.n_tokens

    def _plan(self, seed: int, epoch: int) -> list[Bucket]:
        order = rng(seed, epoch, 0).permutation(len(self.corpus))
        pieces = [(int(i), int(self._kept_per_seq[i])) for i in order if self._kept_per_seq[i] > 0]
        return group_pieces(pieces, self.buffer_tokens)

    def _load(self, bucket: Bucket) -> dict[Site, torch.Tensor]:
        parts: dict[Site, list[torch.Tensor]] = {s: [] for s in self.sites}
        seqs = np.asarray(bucket.pieces)
        for i in range(0, len(seqs), self.seqs_per_forward):
            batch = seqs[i : i + self.seqs_per_forward]
            rows = capture_kept(self.model, self.sites, self.corpus.input_ids[batch], self.corpus.keep_mask[batch])
            for s in self.sites:
                parts[s].append(rows[s])
        return {s: torch.cat(parts[s]) for s in self.sites}

