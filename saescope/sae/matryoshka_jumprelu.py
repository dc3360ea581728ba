"""Matryoshka JumpReLU SAE: nested dictionaries trained with JumpReLU's own objective.

Latents are split into blocks at the prefix widths m₁ < … < m_K < F; the loss is

    Σ_k ‖x − x̂_{m_k}‖² + ‖x − x̂_F‖² + sparsity,   x̂_m = b_dec + Σ_{i<m} f_i·W_dec,i

so the first m_k latents form a usable SAE of width m_k on their own (:meth:`prefix`), and the
sparsity term (λ·L0, or Gemma Scope 2's quadratic around a target L0, plus the optional frequency
penalty) is JumpReLU's, on the whole code.  SAELens trains Matryoshka SAEs as BatchTopK only.

Each block runs through the fused JumpReLU step on its own slice of the weights (the latent-
sharded SAE's trick: the step adds b_dec, later blocks subtract it again).  Autograd then gives
block j's decoder output the sum of the gradients of every prefix that contains it,
Σ_{k≥j} ∂mse_k/∂x̂_k, which is exactly the Matryoshka loss's gradient; the encoder product costs
what one step costs, the decoder side one B×D sum per prefix more.

At inference this is a JumpReLU SAE; it is released as one (``to_jumprelu``), with its prefixes
in ``config.json`` (``matryoshka_prefixes``) so that evaluation reports every prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saescope.sae.base import LossOutput
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saescope.sae.prefixes import blocks, check_prefixes, prefix_mses


@dataclass
class MatryoshkaJumpReLUConfig(JumpReLUConfig):
    """JumpReLU's options plus the prefix widths below d_sae (``()``: d_sae/16 and d_sae/4)."""

    architecture: str = "matryoshka_jumprelu"
    prefixes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.prefixes = check_prefixes(self.prefixes, self.d_sae)  # (config.json gives a list)


class MatryoshkaJumpReLUSAE(JumpReLUSAE):
    architecture = "matryoshka_jumprelu"

    def __init__(self, cfg: MatryoshkaJumpReLUConfig, step_path: str = "auto"):
        super().__init__(cfg, step_path=step_path)

    @property
    def prefix_widths(self) -> tuple[int, ...]:
        """Every nested width, the full one last."""
        return (*self.cfg.prefixes, self.cfg.d_sae)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        parts, l0s, counts = [], [], []
        for j, (lo, hi) in enumerate(blocks(self.cfg.prefixes, self.cfg.d_sae)):
            part_BD, l0_B, fired_F = self.step(x_BD, lo, hi)
            parts.append(part_BD - self.b_dec)
            l0s.append(l0_B)
            counts.append(fired_F)
        x_hat_BD, mses = prefix_mses(x_BD, parts, self.b_dec)
        return self.objective(x_BD, x_hat_BD, torch.stack(l0s).sum(0), torch.cat(counts), sparsity_coefficient,
                              extra_mse=torch.stack(mses[:-1]).sum())

    @torch.no_grad()
    def to_jumprelu(self) -> JumpReLUSAE:
        """The same SAE as a plain :class:`JumpReLUSAE` (its inference code), prefixes in metadata."""
        meta = {**self.cfg.metadata, "trained_as": self.architecture, "prefixes": list(self.cfg.prefixes)}
        return _as_jumprelu(self, meta)


def _as_jumprelu(sae, metadata: dict) -> JumpReLUSAE:
    cfg = JumpReLUConfig(sae.cfg.d_in, sae.cfg.d_sae, centre_input=sae.cfg.centre_input, metadata=metadata)
    out = JumpReLUSAE(cfg)
    out.load_arrays(sae.to_arrays())
    out.tokens_since_fired_F.copy_(sae.tokens_since_fired_F)
    return out.to(sae.W_enc.device)
