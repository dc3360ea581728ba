"""JumpReLU SAE (Rajamanoharan et al. 2024), trained the Gemma Scope way.

f = π·H(π − θ) with a learned per-latent threshold θ; loss = ‖x − x̂‖² + λ·‖f‖₀, with the L0
made trainable by pseudo-derivatives (rectangle kernel, bandwidth ε) that reach θ only.  The
training step is one fused autograd Function, :func:`saescope.sae.jumprelu_step.jumprelu_step`.

θ is trained directly, not as log θ: under Adam a log-parameterised θ moves by ~lr·θ per step
and barely leaves its initial 0.001 (SAELens #494/#718).  θ must stay positive (at θ ≤ 0 the
gate passes negative pre-activations): after each optimizer step call
:meth:`JumpReLUSAE.clamp_threshold_` — :class:`saescope.train.sae_trainer.SAETrainer` clamps
``threshold`` to ``recipe.threshold_min`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saescope.sae.base import SAE, LossOutput, SAEConfig
from saescope.sae.jumprelu_step import PATHS, jumprelu_step


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU's options: the kernel bandwidth ε (training only) and the initial threshold θ₀."""

    architecture: str = "jumprelu"
    bandwidth: float = 0.001
    threshold_init: float = 0.001


class JumpReLUSAE(SAE):
    """Parameters ``W_enc`` (D, F), ``W_dec`` (F, D), ``b_enc`` (F), ``b_dec`` (D), ``threshold`` (F).

    ``step_path`` picks the training kernel: ``"auto"`` (default), ``"dense"`` or ``"sparse"``;
    all three give the same gradients (see :mod:`saescope.sae.jumprelu_step`).
    """

    architecture = "jumprelu"
    latents_rescalable = True
    array_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

    def __init__(self, cfg: JumpReLUConfig, step_path: str = "auto"):
        if cfg.bandwidth <= 0 or cfg.threshold_init <= 0:
            raise ValueError(f"JumpReLU needs bandwidth > 0 and threshold_init > 0, got {cfg.bandwidth}, {cfg.threshold_init}")
        if step_path not in PATHS:
            raise ValueError(f"unknown step_path {step_path!r}; use one of {', '.join(PATHS)}")
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.threshold_init)))
        self.step_path = step_path

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents ReLU(π)·1[π > θ] — Gemma Scope's inference formula (equal to π·H(π − θ) for θ > 0).

        Differentiable w.r.t. π only; training uses :meth:`loss`, which also trains θ."""
        pre_BF = self.pre_activations(x_BD)
        return pre_BF.relu() * (pre_BF > self.threshold)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        """‖x − x̂‖² (summed over D, mean over B) + λ·(mean over B of Σᵢ H(πᵢ − θᵢ))."""
        x_hat_BD, l0, fired_F = jumprelu_step(
            x_BD, self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.threshold,
            bandwidth=self.cfg.bandwidth, centre_input=self.cfg.centre_input, path=self.step_path,
        )
        return l0_penalised_loss(x_BD, x_hat_BD, l0, fired_F, sparsity_coefficient)

    @torch.no_grad()
    def clamp_threshold_(self, minimum: float = 1e-6) -> None:
        """Keep θ positive; call after each optimizer step (projection, not a graph op, so a
        latent whose θ reaches the floor still gets gradient)."""
        self.threshold.clamp_(min=minimum)

    def _scale_latents_(self, n_F: torch.Tensor) -> None:
        self.threshold.mul_(n_F)  # θ′ = C·θ (per latent)


def l0_penalised_loss(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, l0: torch.Tensor, fired_F: torch.Tensor,
                      sparsity_coefficient: float) -> LossOutput:
    """The JumpReLU objective from a step's outputs: ‖x − x̂‖² (summed over D, mean over B) + λ·L0.
    Shared by the whole and the latent-sharded SAE, so both optimise exactly the same loss."""
    mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
    sparsity = sparsity_coefficient * l0
    return LossOutput(
        total=mse + sparsity,
        mse=mse.detach(),
        sparsity=sparsity.detach(),
        aux=torch.zeros((), device=x_BD.device),
        l0=l0.detach(),
        fired_F=fired_F,
        x_hat_BD=x_hat_BD.detach(),
    )
