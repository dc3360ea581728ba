"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; SAELens's ``matryoshka_batchtopk``): the
baseline for :mod:`saescope.sae.matryoshka_jumprelu`.

The batch-level top-k·B selection is BatchTopK's, over all latents; the loss is the sum over
prefixes m₁ < … < F of ‖x − x̂_m‖² (x̂_m decodes only the selected latents below m) plus AuxK.
Released, like BatchTopK, as a JumpReLU with its calibrated threshold and its prefixes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saescope.sae.base import LossOutput
from saescope.sae.batchtopk import BatchTopKSAE
from saescope.sae.prefixes import blocks, check_prefixes, prefix_mses
from saescope.sae.topk import TopKConfig


@dataclass
class MatryoshkaBatchTopKConfig(TopKConfig):
    """BatchTopK's options plus the prefix widths below d_sae (``()``: d_sae/16 and d_sae/4)."""

    architecture: str = "matryoshka_batchtopk"
    prefixes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.prefixes = check_prefixes(self.prefixes, self.d_sae)  # (config.json gives a list)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"

    def __init__(self, cfg: MatryoshkaBatchTopKConfig):
        super().__init__(cfg)

    @property
    def prefix_widths(self) -> tuple[int, ...]:
        return (*self.cfg.prefixes, self.cfg.d_sae)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float = 0.0) -> LossOutput:
        pre_BF = self.pre_activations(x_BD)
        f_BF = self._batch_topk(pre_BF)
        parts = [f_BF[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in blocks(self.cfg.prefixes, self.cfg.d_sae)]
        x_hat_BD, mses = prefix_mses(x_BD, parts, self.b_dec)
        active_BF = f_BF > 0
        aux = self.aux_loss(pre_BF, (x_BD - x_hat_BD).detach())
        if self.training:
            self.update_threshold_(f_BF)
        weighted_aux = self.cfg.aux_coefficient * aux
        prefix = torch.stack(mses[:-1]).sum()
        return LossOutput(
            total=mses[-1] + prefix + weighted_aux,
            mse=mses[-1].detach(),
            sparsity=torch.zeros((), device=x_BD.device),
            aux=(prefix + weighted_aux).detach(),
            l0=active_BF.sum(dim=-1).float().mean(),
            fired_F=active_BF.sum(dim=0),
            x_hat_BD=x_hat_BD.detach(),
        )

    @torch.no_grad()
    def to_jumprelu(self):
        from saescope.sae.matryoshka_jumprelu import _as_jumprelu

        meta = {**self.cfg.metadata, "trained_as": self.architecture, "k": self.cfg.k,
                "prefixes": list(self.cfg.prefixes)}
        return _as_jumprelu(self, meta)
