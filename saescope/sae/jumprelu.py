"""JumpReLU SAE (Rajamanoharan et al. 2024), trained the Gemma Scope way.

f = π·H(π − θ) with a learned per-latent threshold θ; loss = ‖x − x̂‖² + λ·‖f‖₀, with the L0
made trainable by pseudo-derivatives (rectangle kernel, bandwidth ε) that reach θ only.  The
training step is one fused autograd Function, :func:`saescope.sae.jumprelu_step.jumprelu_step`.

Gemma Scope 2's options (:func:`l0_penalised_loss`, which every JumpReLU-family loss calls, so
the whole, latent-sharded, Matryoshka SAEs and transcoders get them alike):

* ``target_l0`` L*: the sparsity term becomes λ·(2/L*)·mean_b (‖f_b‖₀ − L*)², per token;
* ``max_frequency`` τ: a penalty on latents whose running firing frequency p̂_i exceeds τ,
  β·λ·Σ_i 1[p̂_i > τ]·p_i with p_i the batch's firing frequency: each firing of a latent above τ
  costs β·λ more.  Its gradient reaches θ by the pseudo-derivative and, unlike the L0's, π too
  (straight through the kernel), so b_enc cannot simply follow θ up (docs/gemma-scope-2.md).

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
    #: training only: L* of Gemma Scope 2's per-token quadratic λ·(2/L*)·(‖f‖₀ − L*)² (None: λ·‖f‖₀)
    target_l0: float | None = None
    #: training only: τ, the firing frequency above which a latent is penalised (None: no penalty)
    max_frequency: float | None = None
    #: training only: β, the frequency penalty's weight relative to λ
    frequency_coefficient: float = 1.0
    #: training only: the running frequency p̂ averages over about this many batches
    frequency_window: int = 8


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
        if cfg.target_l0 is not None and not cfg.target_l0 > 0:
            raise ValueError(f"target_l0 must be > 0, got {cfg.target_l0}")
        if cfg.max_frequency is not None and not 0 < cfg.max_frequency < 1:
            raise ValueError(f"max_frequency must lie in (0, 1), got {cfg.max_frequency}")
        if cfg.frequency_coefficient < 0 or cfg.frequency_window < 1:
            raise ValueError("frequency_coefficient must be >= 0 and frequency_window >= 1")
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.threshold_init)))
        self.step_path = step_path
        if cfg.max_frequency is not None:  # p̂: state that travels with the SAE (checkpoints, shards)
            self.register_buffer("frequency_F", torch.zeros(cfg.d_sae))
            self.register_buffer("frequency_batches", torch.zeros((), dtype=torch.int64))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents ReLU(π)·1[π > θ] — Gemma Scope's inference formula (equal to π·H(π − θ) for θ > 0).

        Differentiable w.r.t. π only; training uses :meth:`loss`, which also trains θ."""
        pre_BF = self.pre_activations(x_BD)
        return pre_BF.relu() * (pre_BF > self.threshold)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        """‖x − x̂‖² (summed over D, mean over B) + λ·(mean over B of Σᵢ H(πᵢ − θᵢ)), or the
        options' terms (module docstring)."""
        x_hat_BD, l0_B, fired_F = self.step(x_BD)
        return self.objective(x_BD, x_hat_BD, l0_B, fired_F, sparsity_coefficient)

    def step(self, x_BD: torch.Tensor, lo: int = 0, hi: int | None = None):
        """The fused step on latents ``[lo, hi)`` (default all): ``(x̂, l0_B, fired_F)`` with
        per-token and per-latent counts that carry θ's pseudo-gradient (``counts=True``)."""
        W_enc, W_dec, b_enc, threshold = self.W_enc, self.W_dec, self.b_enc, self.threshold
        if lo != 0 or (hi is not None and hi != self.cfg.d_sae):  # (no slice ops on the whole SAE's graph)
            sl = slice(lo, hi)
            W_enc, W_dec, b_enc, threshold = W_enc[:, sl], W_dec[sl], b_enc[sl], threshold[sl]
        return jumprelu_step(
            x_BD, W_enc, W_dec, b_enc, self.b_dec, threshold,
            bandwidth=self.cfg.bandwidth, centre_input=self.cfg.centre_input, path=self.step_path, counts=True,
            counts_straight_through=self.cfg.max_frequency is not None,  # only the frequency penalty uses them
        )

    def objective(self, target_BD: torch.Tensor, x_hat_BD: torch.Tensor, l0_B: torch.Tensor, fired_F: torch.Tensor,
                  sparsity_coefficient: float, extra_mse: torch.Tensor | None = None) -> LossOutput:
        """This SAE's loss from a step's outputs (:func:`l0_penalised_loss` with its options);
        ``target_BD`` is what x̂ should match (the input, or a transcoder's output)."""
        return l0_penalised_loss(target_BD, x_hat_BD, l0_B, fired_F, sparsity_coefficient, sae=self,
                                 extra_mse=extra_mse)

    @torch.no_grad()
    def init_threshold_at_l0_(self, x_BD: torch.Tensor, l0: float, minimum: float = 1e-6) -> None:
        """θ_i ← the (1 − L0/F) quantile of latent i's pre-activations on ``x_BD`` (halfway between
        the k-th and (k+1)-th largest, k = L0·B/F), so each latent fires on a share L0/F of these
        tokens and the SAE on L0 per token on average; at least ``minimum``.  A latent shard uses
        the whole SAE's F."""
        B = x_BD.shape[0]
        width = getattr(self, "full_cfg", self.cfg).d_sae
        k = min(max(1, round(l0 * B / width)), B - 1)
        top_KF = self.pre_activations(x_BD.float()).topk(k + 1, dim=0).values
        self.threshold.copy_(((top_KF[k - 1] + top_KF[k]) / 2).clamp_min(minimum))

    @torch.no_grad()
    def update_frequency_(self, fired_F: torch.Tensor, n_tokens: int) -> None:
        """p̂ ← p̂ + (p − p̂)/min(n, window), p = this batch's firing frequency (a running mean
        over the first batches, then an exponential one)."""
        self.frequency_batches += 1
        rate = 1.0 / float(min(int(self.frequency_batches), self.cfg.frequency_window))
        self.frequency_F.add_(rate * (fired_F.detach().to(self.frequency_F) / n_tokens - self.frequency_F))

    @torch.no_grad()
    def prefix(self, m: int) -> JumpReLUSAE:
        """A JumpReLU SAE of this one's first ``m`` latents only (a Matryoshka SAE's nested
        dictionaries), in the same form; the training-only options are dropped."""
        if not 1 <= m <= self.cfg.d_sae:
            raise ValueError(f"a prefix needs 1 <= m <= d_sae ({self.cfg.d_sae}), got {m}")
        cfg = JumpReLUConfig(self.cfg.d_in, m, centre_input=self.cfg.centre_input, bandwidth=self.cfg.bandwidth,
                             metadata={**self.cfg.metadata, "prefix_of": self.cfg.d_sae})
        with torch.device("meta"):
            out = JumpReLUSAE(cfg, step_path=self.step_path)
        out = out.to_empty(device=self.W_enc.device)
        arrays = self.to_arrays()
        out.load_arrays({"W_enc": arrays["W_enc"][:, :m], "W_dec": arrays["W_dec"][:m], "b_enc": arrays["b_enc"][:m],
                         "b_dec": arrays["b_dec"], "threshold": arrays["threshold"][:m]})
        out.tokens_since_fired_F.copy_(self.tokens_since_fired_F[:m])
        return out

    @torch.no_grad()
    def clamp_threshold_(self, minimum: float = 1e-6) -> None:
        """Keep θ positive; call after each optimizer step (projection, not a graph op, so a
        latent whose θ reaches the floor still gets gradient)."""
        self.threshold.clamp_(min=minimum)

    def _scale_latents_(self, n_F: torch.Tensor) -> None:
        self.threshold.mul_(n_F)  # θ′ = C·θ (per latent)


def quadratic_l0_penalty(l0_B: torch.Tensor, target_l0: float, coefficient: float) -> torch.Tensor:
    """Gemma Scope 2's sparsity term λ·(2/L*)·mean_b (l0_b − L*)², from per-token L0s.  Its
    gradient on token b's L0 is λ·(4/L*)·(l0_b − L*)/B: zero at the target, pushing θ up on tokens
    above it and down on tokens below (the θ route: ∂l0_b/∂θ_i = −(1/ε)·K((π_bi − θ_i)/ε))."""
    return coefficient * (2.0 / target_l0) * (l0_B - target_l0).pow(2).mean()


def frequency_penalty(fired_F: torch.Tensor, n_tokens: int, frequency_F: torch.Tensor, max_frequency: float,
                      coefficient: float) -> torch.Tensor:
    """coefficient·Σ_i w_i·(c_i/B) with w_i = 1[p̂_i > τ] held constant: zero for latents whose
    running frequency p̂_i is at most τ; ``fired_F`` (c_i) carries θ's pseudo-gradient, so
    ∂/∂θ_i = −coefficient·w_i·(tokens in θ_i's window)/(ε·B) (and, straight through, the same with
    the opposite sign on π)."""
    weight_F = (frequency_F > max_frequency).to(fired_F.dtype)
    return coefficient * (weight_F.to(fired_F) * fired_F).sum() / n_tokens


def l0_penalised_loss(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, l0: torch.Tensor, fired_F: torch.Tensor,
                      sparsity_coefficient: float, *, sae: JumpReLUSAE | None = None,
                      extra_mse: torch.Tensor | None = None) -> LossOutput:
    """The JumpReLU objective from a step's outputs: ‖x − x̂‖² (summed over D, mean over B) + λ·L0.
    Shared by the whole, the latent-sharded and the Matryoshka SAE (and transcoders, with their
    target y as ``x_BD``), so all optimise exactly the same loss.

    ``l0`` is the mean L0, or per-token L0s (B,) from ``jumprelu_step(..., counts=True)``.
    ``sae`` (a JumpReLU-family SAE) brings its options: a target L0 (needs per-token ``l0``) and
    the frequency penalty (needs float ``fired_F`` with θ's gradient; in training mode it also
    updates the SAE's running frequency).  ``extra_mse`` (Matryoshka: the smaller prefixes'
    reconstruction errors) is added to the total and reported with the penalty as ``aux``.
    """
    mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
    cfg = sae.cfg if sae is not None else None
    target = getattr(cfg, "target_l0", None)
    if target is None:
        sparsity = sparsity_coefficient * l0.mean()
    else:
        if l0.ndim != 1:
            raise ValueError("a target L0 needs per-token L0s: call jumprelu_step(..., counts=True)")
        sparsity = quadratic_l0_penalty(l0, target, sparsity_coefficient)
    aux = torch.zeros((), device=x_BD.device) if extra_mse is None else extra_mse
    tau = getattr(cfg, "max_frequency", None)
    if tau is not None:
        if not fired_F.is_floating_point():
            raise ValueError("the frequency penalty needs float firing counts: call jumprelu_step(..., counts=True)")
        n_tokens = x_BD.shape[0]
        if sae.training:
            sae.update_frequency_(fired_F, n_tokens)
        aux = aux + frequency_penalty(fired_F, n_tokens, sae.frequency_F, tau,
                                      cfg.frequency_coefficient * sparsity_coefficient)
    return LossOutput(
        total=mse + sparsity + aux,
        mse=mse.detach(),
        sparsity=sparsity.detach(),
        aux=aux.detach(),
        l0=l0.detach().mean(),
        fired_F=fired_F.detach().to(torch.int64),
        x_hat_BD=x_hat_BD.detach(),
    )
