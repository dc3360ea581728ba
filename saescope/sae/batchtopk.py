"""BatchTopK SAE (Bussmann, Leask & Nanda 2024).

Training keeps the k·B largest ReLU pre-activations of the whole batch (k per token on
average, more for tokens that need it), with TopK's AuxK loss for dead latents.  A batch-level
selection cannot be used on one token at inference, so — as in the paper — a global threshold θ
is estimated during training as the running mean of the smallest kept activation per batch, and
inference is JumpReLU with that θ: f = ReLU(π)·1[π > θ].  θ is stored per latent (all equal) as
``threshold``, so a released BatchTopK SAE is a JumpReLU-style ``params.npz``.
"""

from __future__ import annotations

import torch

from saescope.sae.base import LossOutput
from saescope.sae.batchtopk_step import batchtopk_step
from saescope.sae.topk import TopKConfig, TopKSAE


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    array_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    latents_rescalable = True  # released as a JumpReLU: per-latent thresholds
    #: train with the fused step when no latent is dead (False: always plain autograd)
    use_fused_step = True
    #: the fused step's sparse code (None: on a CPU in float32; saescope.sae.batchtopk_step)
    sparse_step: bool | None = None
    #: the running mean becomes an exponential average over about this many batches
    threshold_window = 1000

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Inference code: JumpReLU with the estimated threshold (per token, batch-independent)."""
        pre_BF = self.pre_activations(x_BD)
        return pre_BF.relu() * (pre_BF > self.threshold)

    def encode_batch(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Training code: the k·B largest ReLU pre-activations of the batch."""
        return self._batch_topk(self.pre_activations(x_BD))

    def _batch_topk(self, pre_BF: torch.Tensor) -> torch.Tensor:
        acts_BF = pre_BF.relu()
        flat = acts_BF.flatten()
        n_keep = min(self.cfg.k * acts_BF.shape[0], flat.numel())
        values, flat_indices = _top_values(flat, n_keep)
        return torch.zeros_like(acts_BF).flatten().scatter_(0, flat_indices, values).view_as(acts_BF)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float = 0.0) -> LossOutput:
        """‖x − x̂‖² + aux_coefficient·AuxK on the batch-top-k code; ``sparsity_coefficient`` is
        ignored (k sets the sparsity).  In training mode also updates the inference threshold.

        Without dead latents (AuxK is then zero) the step is one fused Function
        (:mod:`saescope.sae.batchtopk_step`, ~2.5× faster on CPU); with some, plain autograd."""
        if self.use_fused_step and self.W_enc.requires_grad and not bool(self.dead_mask().any()):
            return self._fused_loss(x_BD)
        pre_BF = self.pre_activations(x_BD)
        f_BF = self._batch_topk(pre_BF)
        x_hat_BD = self.decode(f_BF)
        mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
        active_BF = f_BF > 0
        fired_F = active_BF.sum(dim=0)
        aux = self.aux_loss(pre_BF, (x_BD - x_hat_BD).detach())
        if self.training:
            self.update_threshold_(f_BF)
        weighted_aux = self.cfg.aux_coefficient * aux
        return LossOutput(
            total=mse + weighted_aux,
            mse=mse.detach(),
            sparsity=torch.zeros((), device=x_BD.device),
            aux=weighted_aux.detach(),
            l0=active_BF.sum(dim=-1).float().mean(),
            fired_F=fired_F,
            x_hat_BD=x_hat_BD.detach(),
        )

    def _fused_loss(self, x_BD: torch.Tensor) -> LossOutput:
        x_hat_BD, fired_F, cut = batchtopk_step(x_BD, self.W_enc, self.W_dec, self.b_enc, self.b_dec, self.cfg.k,
                                                centre_input=self.cfg.centre_input, sparse=self.sparse_step)
        mse = (x_hat_BD - x_BD).pow(2).sum(dim=-1).mean()
        if self.training:
            self._update_threshold_from_(cut)
        zero = torch.zeros((), device=x_BD.device)
        return LossOutput(total=mse, mse=mse.detach(), sparsity=zero, aux=zero,
                          l0=fired_F.sum().float() / x_BD.shape[0], fired_F=fired_F, x_hat_BD=x_hat_BD.detach())

    @torch.no_grad()
    def calibrate_threshold_(self, x_BD: torch.Tensor) -> None:
        """θ ← the threshold under which the inference code fires exactly as the batch-level
        top-k does on ``x_BD``.  Called on
        the run's last batch, so the released SAE's L0 is k there, not the running average's."""
        acts = self.pre_activations(x_BD).relu().flatten()
        n_keep = min(self.cfg.k * x_BD.shape[0], acts.numel() - 1)
        top = acts.topk(n_keep + 1).values  # sorted: the kept ones, then the first one left out
        # halfway between the last kept and the first dropped: ReLU(π)·1[π > θ] keeps exactly the
        # same latents on this batch (barring ties), with a margin for other tokens
        self.threshold.fill_(float((top[n_keep - 1] + top[n_keep]) / 2))

    @torch.no_grad()
    def to_jumprelu(self):
        """The same SAE as a :class:`~saescope.sae.jumprelu.JumpReLUSAE`: its inference code is
        already ReLU(π)·1[π > θ], so every latent of every token is unchanged (Gemma Scope 2
        trained its multi-layer models as BatchTopK and released them as JumpReLU)."""
        from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE

        out = JumpReLUSAE(JumpReLUConfig(self.cfg.d_in, self.cfg.d_sae, centre_input=self.cfg.centre_input,
                                         metadata={**self.cfg.metadata, "trained_as": "batchtopk", "k": self.cfg.k}))
        out.load_arrays(self.to_arrays())
        return out.to(self.W_enc.device)

    @torch.no_grad()
    def update_threshold_(self, f_BF: torch.Tensor) -> None:
        """θ ← θ + (m − θ)/min(n, window), m = the smallest kept activation of this batch."""
        kept = f_BF[f_BF > 0]
        if kept.numel() == 0:
            return
        self._update_threshold_from_(kept.min())

    @torch.no_grad()
    def _update_threshold_from_(self, smallest_kept: torch.Tensor) -> None:
        self.threshold_batches += 1
        rate = 1.0 / self.threshold_batches.clamp(max=self.threshold_window).to(self.threshold.dtype)
        self.threshold.add_(rate * (smallest_kept - self.threshold))

    def _scale_latents_(self, n_F: torch.Tensor) -> None:
        self.threshold.mul_(n_F)  # θ′ = C·θ (per latent)


def _top_values(flat: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``flat.topk(n_keep, sorted=False)``, exactly, but faster when n_keep ≪ len(flat): a cut
    read off a strided sample keeps ~1.5·n_keep candidates, and only those are ranked (on 2M
    activations with k·B = 100k, a full top-k costs twice the step's encoder product)."""
    n = flat.numel()
    if n_keep * 8 > n or n < 2**16:
        return flat.topk(n_keep, sorted=False)
    with torch.no_grad():
        sample = flat.detach()[:: max(1, n // 2**16)]
        rank = max(1, int(len(sample) * (1 - 1.5 * n_keep / n)))
        cut = sample.kthvalue(rank).values
        candidates = (flat.detach() > cut).nonzero().squeeze(1)
    if len(candidates) < n_keep:  # the sample misjudged the cut: rank everything
        return flat.topk(n_keep, sorted=False)
    values, chosen = flat[candidates].topk(n_keep, sorted=False)
    return values, candidates[chosen]
