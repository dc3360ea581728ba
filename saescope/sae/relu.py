"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates — April
2024"): f = ReLU(π), loss = ‖x − x̂‖² + λ·Σᵢ fᵢ‖W_dec,ᵢ‖.

Weighting by ‖W_dec,ᵢ‖ makes the penalty indifferent to moving scale between a latent and its
decoder row, so the decoder need not be held at unit norm; with the Gemma Scope recipe's
unit-norm rule on (the trainer's default) it equals the classic L1 penalty.
"""

from __future__ import annotations

import torch

from saescope.sae.base import SAE, LossOutput


class ReLUSAE(SAE):
    architecture = "relu"
    latents_rescalable = True

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x_BD).relu()

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        """‖x − x̂‖² (summed over D, mean over B) + λ·Σᵢ fᵢ‖W_dec,ᵢ‖ (mean over B)."""
        f_BF = self.encode(x_BD)
        x_hat_BD = self.decode(f_BF)
        mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
        l1 = (f_BF @ self.W_dec.norm(dim=1)).mean()
        sparsity = sparsity_coefficient * l1
        active_BF = f_BF > 0
        return LossOutput(
            total=mse + sparsity,
            mse=mse.detach(),
            sparsity=sparsity.detach(),
            aux=torch.zeros((), device=x_BD.device),
            l0=active_BF.sum(dim=-1).float().mean(),
            fired_F=active_BF.sum(dim=0),
            x_hat_BD=x_hat_BD.detach(),
        )
