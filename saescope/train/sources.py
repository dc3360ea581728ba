"""A :class:`~saescope.batches.BatchSource` over activations already in memory.

For notebooks ("I have a tensor of activations, train SAEs on it") and for tests.  Same
contract as the store reader and the online stream: deterministic order for a seed, loops over
epochs (reshuffled each epoch), and can start at any batch without reading the ones before.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from saescope.sites import Site


class InMemorySource:
    """Batches drawn from ``{site: x_ND}`` tensors that all hold the same N rows (tokens).

    Row i of every site belongs to the same token, so one permutation per epoch serves all sites.
    A trailing partial batch is dropped each epoch (each epoch has ``N // batch_size`` batches).
    """

    def __init__(self, tensors: dict[Site, torch.Tensor]):
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

    def iter_batches(
        self, batch_size: int, *, seed: int = 0, skip_batches: int = 0
    ) -> Iterator[dict[Site, torch.Tensor]]:
        per_epoch = self.n_tokens // batch_size
        if per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.n_tokens} tokens held in memory")
        epoch, index = divmod(skip_batches, per_epoch)
        while True:
            order = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            for i in range(index, per_epoch):
                rows = order[i * batch_size : (i + 1) * batch_size]
                yield {site: t[rows] for site, t in self._tensors.items()}
            epoch, index = epoch + 1, 0
