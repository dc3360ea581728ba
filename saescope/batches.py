"""The one interface between where activations come from and the trainer.

Both the on-disk store's shuffled reader (:mod:`saescope.store`) and the online stream from a
live model (:mod:`saescope.stream`) are a :class:`BatchSource`.  The trainer only ever sees this
protocol, so "harvest then train" and "harvest and train in one pass" share every line of it.

A source yields, per step, one float32 batch per site: ``{site: x_BD}`` with the *same*
``batch_size`` rows for every site.  Iteration is deterministic for a given ``seed`` and can
start at any step (``skip_batches``), which is what makes a resumed run bit-identical to an
uninterrupted one.  Sources loop over their data (epochs, reshuffled per epoch) until the
consumer stops.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch

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
