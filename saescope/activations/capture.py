"""The one forward-and-keep: run the model once over a batch of sequences and keep, for every
requested site, the rows of the positions the corpus keeps (not BOS, EOS or padding).

Both the harvest (rows to disk) and the online source (rows to the trainer) call
:func:`capture_kept`; the checks that a model can run on a corpus and has the requested sites
live here too, so both refuse bad input with the same message.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from saescope.sites import Site, capture, data_sites, n_layers
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
    """The sites to capture for the requested ones, sorted and deduplicated (a transcoder site:
    its ``mlp_in`` and ``mlp_out``, :func:`~saescope.sites.data_sites`); refuses none, or a layer
    the model lacks."""
    sites = data_sites(sites)
    if not sites:
        raise ValueError("no site requested")
    layers = n_layers(model)
    for site in sites:
        if site.layer >= layers:
            raise ValueError(f"site {site} out of range: the model has {layers} layers")
    return sites


def kept_runs(keep: np.ndarray) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: the runs of consecutive True values of a flat mask, as half-open ranges."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], keep, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@torch.no_grad()
def capture_kept(
    model: nn.Module,
    sites: list[Site],
    input_ids_BT: np.ndarray,
    keep_BT: np.ndarray,
    dtype: torch.dtype = torch.float32,
    *,
    gather: bool = True,
) -> tuple[dict[Site, torch.Tensor], list[tuple[int, int]]]:
    """One forward; every site's rows on the CPU in ``dtype``, and the runs of kept rows in them.

    ``gather=True``: the rows are the kept positions only, ``(n_kept, D)`` in row-major
    (sequence, position) order, and the runs are ``[(0, n_kept)]``.  ``gather=False`` (the
    harvest on a CPU): the rows are every position, ``(B·T, D)``, and the runs say which to keep,
    so a writer can copy the kept runs straight from them with no gather copy.  On an accelerator
    the kept rows are always gathered on the device, so only they cross to the host.
    """
    device = model_device(model)
    acts = capture(model, sites, torch.as_tensor(input_ids_BT, dtype=torch.long).to(device))
    keep = np.asarray(keep_BT).reshape(-1)
    if not gather and device.type == "cpu":
        return {s: acts[s].flatten(0, 1).to(dtype) for s in sites}, kept_runs(keep)
    kept = torch.as_tensor(np.flatnonzero(keep)).to(device)
    rows = {s: acts[s].flatten(0, 1).index_select(0, kept).to(device="cpu", dtype=dtype) for s in sites}
    return rows, [(0, len(kept))]
