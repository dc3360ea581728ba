"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = ReLU(TopK_k(π)): each token keeps its k largest pre-activations.  Sparsity is set by k, so
:meth:`TopKSAE.loss` ignores its ``sparsity_coefficient``.  Its standard companion is the AuxK
loss against dead latents: the k_aux largest pre-activations among latents that have not fired
for ``cfg.dead_tokens`` tokens try to reconstruct the residual x − x̂ (held fixed), weighted by
``cfg.aux_coefficient`` (1/32).  Gao et al. found it keeps dead latents near zero at scale.

Dead latents are read from the SAE's counter ``tokens_since_fired_F`` (:class:`SAE`), which
:class:`~saescope.train.sae_trainer.SAETrainer` advances after every step; a loop of one's own
calls ``sae.update_dead_(out.fired_F, len(x))`` after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

from saescope.sae.base import SAE, LossOutput, SAEConfig


@dataclass
class TopKConfig(SAEConfig):
    """TopK's (and BatchTopK's) options: latents kept per token (BatchTopK: on average), and the
    dead-latent (AuxK) loss's latents (None: d_in // 2), weight, and how many tokens without
    firing make a latent dead (Gao et al. 2024: k_aux 512, 1/32, 10M)."""

    architecture: str = "topk"
    k: int | None = None
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 10_000_000


class TopKSAE(SAE):
    architecture = "topk"

    def __init__(self, cfg: TopKConfig):
        if cfg.k is None or not 1 <= cfg.k <= cfg.d_sae:
            raise ValueError(f"{self.architecture} SAE needs 1 <= k <= d_sae ({cfg.d_sae}), got k={cfg.k}")
        if cfg.aux_k is not None and cfg.aux_k < 1:
            raise ValueError(f"aux_k must be >= 1 (or None for d_in // 2), got {cfg.aux_k}")
        super().__init__(cfg)

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k if self.cfg.aux_k is not None else max(1, self.cfg.d_in // 2)

    # --- sparse codes ------------------------------------------------------------------------

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept latents as (values_BK ≥ 0, indices_BK)."""
        values_BK, indices_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return values_BK.relu(), indices_BK

    def decode_sparse(self, values_BK: torch.Tensor, indices_BK: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """x̂ from k (value, index) pairs per token, without forming the B×F code."""
        x_hat_BD = nnf.embedding_bag(indices_BK, self.W_dec, mode="sum", per_sample_weights=values_BK.to(self.W_dec.dtype))
        return x_hat_BD + self.b_dec if bias else x_hat_BD

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        values_BK, indices_BK = self.select(pre_BF)
        return torch.zeros_like(pre_BF).scatter_(-1, indices_BK, values_BK)

    # --- training ----------------------------------------------------------------------------

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float = 0.0) -> LossOutput:
        """‖x − x̂‖² (summed over D, mean over B) + aux_coefficient·AuxK.  ``sparsity_coefficient``
        is ignored: k sets the sparsity."""
        pre_BF = self.pre_activations(x_BD)
        values_BK, indices_BK = self.select(pre_BF)
        x_hat_BD = self.decode_sparse(values_BK, indices_BK)
        mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
        fired = values_BK > 0
        fired_F = torch.bincount(indices_BK[fired], minlength=self.cfg.d_sae)
        aux = self.aux_loss(pre_BF, (x_BD - x_hat_BD).detach())
        weighted_aux = self.cfg.aux_coefficient * aux
        return LossOutput(
            total=mse + weighted_aux,
            mse=mse.detach(),
            sparsity=torch.zeros((), device=x_BD.device),
            aux=weighted_aux.detach(),
            l0=fired.sum(dim=-1).float().mean(),
            fired_F=fired_F,
            x_hat_BD=x_hat_BD.detach(),
        )

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.cfg.dead_tokens

    def aux_loss(self, pre_BF: torch.Tensor, residual_BD: torch.Tensor) -> torch.Tensor:
        """AuxK: how well the top-k_aux *dead* latents reconstruct the residual (no b_dec), as
        ‖e − ê‖² summed over D, mean over B; zero when no latent is dead."""
        dead_F = self.dead_mask()
        n_dead = int(dead_F.sum())
        if n_dead == 0:
            return torch.zeros((), device=pre_BF.device)
        k_aux = min(self.aux_k, n_dead)
        dead_pre_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        values_BK, indices_BK = dead_pre_BF.topk(k_aux, dim=-1, sorted=False)
        residual_hat_BD = self.decode_sparse(values_BK.relu(), indices_BK, bias=False)
        return (residual_hat_BD - residual_BD).pow(2).sum(dim=-1).mean()
