"""One batch of evaluation sequences: the token masks and groups, the clean pass, and the hooks
that observe, splice or zero a site.  :mod:`saescope.evaluate.suite` drives these.

Positions (see :mod:`saescope.evaluate.suite` for why):

* kept (``keep_mask``): reconstruction metrics — never BOS, EOS or padding;
* scored: position t predicts token t+1, counted when t is kept and t+1 belongs to a document
  (an EOS target counts, padding does not);
* groups: the corpus subset of the token, and its position bin 1, 2–3, 4–7, 8–15, …
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saescope.evaluate import metrics as M
from saescope.forward import clean_forward, forward_from
from saescope.evaluate.lm_scores import CleanReference
from saescope.evaluate.splice import keep_first_position
from saescope.sae.base import SAE
from saescope.sites import Site, hook_site, hooked, run_to_layer
from saescope.tokens import TokenizedCorpus, scored_positions  # noqa: F401 (scored_positions: re-exported)


def position_bins(seq_len: int) -> list[tuple[int, int]]:
    """Inclusive position ranges (1, 1), (2, 3), (4, 7), … covering positions 1..seq_len−1."""
    bins, start = [], 1
    while start < seq_len:
        bins.append((start, min(2 * start - 1, seq_len - 1)))
        start *= 2
    return bins


def position_bin_index(seq_len: int) -> torch.Tensor:
    """Bin of each position (position 0 gets bin 0 too; it is never kept)."""
    return torch.floor(torch.log2(torch.arange(seq_len).clamp_min(1).double())).long()


class Accumulators:
    """One SAE's running sums: reconstruction and next-token loss, by subset and by position."""

    def __init__(self, sae: SAE, n_subset_groups: int, n_position_bins: int, device):
        d_in, d_sae = int(sae.W_dec.shape[1]), sae.cfg.d_sae  # the width measured: a transcoder's target
        self.recon_subset = M.ReconstructionStats(d_in, d_sae, n_subset_groups, device=device)
        self.recon_position = M.ReconstructionStats(d_in, d_sae, n_position_bins, track_firing=False, device=device)
        self.loss_subset = M.LossStats(n_subset_groups, device)
        self.loss_position = M.LossStats(n_position_bins, device)


class ZeroHook:
    """Zero ablation: the site's tensor replaced by zeros (except position 0 with ``skip_bos``)."""

    def __init__(self, skip_bos: bool):
        self.skip_bos = skip_bos

    def __call__(self, x_BTD: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_BTD)
        return keep_first_position(x_BTD, out) if self.skip_bos else out


class Batch:
    """A batch of sequences (rows of the corpus) on the model's device."""

    def __init__(self, model: nn.Module, corpus: TokenizedCorpus, rows: np.ndarray, scored: np.ndarray,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        #: the model's forwards (not the SAEs') run under autocast to this dtype, if given
        self.autocast_dtype = autocast_dtype
        device = next(model.parameters()).device
        self.ids_BT = torch.from_numpy(corpus.input_ids[rows]).long().to(device)
        self.keep_BT = torch.from_numpy(corpus.keep_mask[rows]).to(device)
        self.scored_BT = torch.from_numpy(scored[rows]).to(device)
        subset_BT = torch.from_numpy(corpus.subset_ids[rows].astype(np.int64)).to(device)
        # tokens without a subset go to an extra last group (counted in the totals only)
        subset_BT = torch.where(subset_BT >= 0, subset_BT, torch.full_like(subset_BT, len(corpus.subsets)))
        position_BT = position_bin_index(self.ids_BT.shape[1]).to(device).expand_as(self.ids_BT)
        # N: kept positions (reconstruction); M: scored positions (next-token loss)
        self.subset_N, self.position_N = subset_BT[self.keep_BT], position_BT[self.keep_BT]
        self.subset_M, self.position_M = subset_BT[self.scored_BT], position_BT[self.scored_BT]
        self.next_token_M = self.ids_BT[:, 1:][self.scored_BT[:, :-1]]
        self.prefix: dict = {}
        self.reference: CleanReference | None = None

    def _observer(self, targets: list[tuple[SAE, Accumulators]]):
        """A site hook ``(y, x)`` (``hook_site(..., with_input=True)``) that feeds the site's kept
        activations to each SAE's reconstruction sums: the SAE reads x and is measured on y (the
        same tensor, except for a transcoder: ``mlp_in`` and ``mlp_out``)."""

        def observe(y_BTD: torch.Tensor, x_BTD: torch.Tensor) -> None:
            y_ND, x_ND = y_BTD[self.keep_BT], x_BTD[self.keep_BT]
            for sae, acc in targets:
                param = sae.W_dec
                x = x_ND.to(device=param.device, dtype=param.dtype)
                y = y_ND.to(device=param.device, dtype=param.dtype)
                with torch.autocast(x.device.type, enabled=False):  # SAEs in their own precision
                    f = sae.encode(x)
                    y_hat = sae.predict(x, f)
                    acc.recon_subset.update(y, y_hat, f, self.subset_N)
                    acc.recon_position.update(y, y_hat, f, self.position_N)

        return observe

    @torch.no_grad()
    def observe(self, by_site: dict[Site, list[tuple[SAE, Accumulators]]], with_loss: bool, chunk: int) -> None:
        """The clean pass.  Reconstruction sums are updated inside it (no activations kept).

        ``with_loss``: run to the end and keep what :meth:`run` needs — what enters each site's
        block, and the clean predictions at scored positions; else stop after the deepest site.
        """
        observers = {site: self._observer(targets) for site, targets in by_site.items()}
        with hooked(self.model, observers, with_input=True):
            if not with_loss:  # reconstruction only: the site activations in full precision
                run_to_layer(self.model, max(s.layer for s in by_site), input_ids=self.ids_BT)
                return
            with self._autocast():
                hidden_BTD, self.prefix = clean_forward(self.model, self.ids_BT, {s.layer for s in by_site})
        with self._autocast():
            self.reference = CleanReference(self.model, hidden_BTD[self.scored_BT], self.next_token_M, chunk,
                                            exact_head=self.autocast_dtype is None)

    def _autocast(self):
        device = self.ids_BT.device.type
        if self.autocast_dtype is None:
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=self.autocast_dtype)

    @torch.no_grad()
    def run(self, site: Site, hook) -> tuple[torch.Tensor, torch.Tensor]:
        """CE and KL(clean ‖ hooked) per scored position, for a forward with ``hook`` at ``site``
        that starts at the site's block from the cached clean prefix."""
        if self.reference is None:
            raise RuntimeError("Batch.run needs observe(..., with_loss=True) first")
        handle = hook_site(self.model, site, hook, with_input=getattr(hook, "with_input", False))
        try:
            with self._autocast():
                hidden_BTD = forward_from(self.model, self.ids_BT, site.layer, self.prefix.get(site.layer))
        finally:
            handle.remove()
        with self._autocast():
            return self.reference.score(hidden_BTD[self.scored_BT])
