"""A JumpReLU SAE whose latents are split across ranks (tensor / "Megatron" parallelism).

Gemma Scope trained its widest SAEs this way.  With W ranks and F latents, rank r holds the
latents ``[r·F/W, (r+1)·F/W)``: those columns of ``W_enc``, those entries of ``b_enc`` and
``threshold``, those rows of ``W_dec``; ``b_dec`` is replicated.  Every rank sees the same batch.

Forward: each rank computes its latents and its partial reconstruction ``f_r·W_dec_r``; one
all-reduce sums the partials into x̂ (identical on every rank), and a second sums the per-shard
L0 counts.  The loss is then the unsharded loss, computed redundantly on every rank.

Backward (why it is exact): x̂ = Σ_r y_r, so ∂L/∂y_r = ∂L/∂x̂, which every rank already has —
the sum's backward is the identity (Megatron's "reduce from the tensor-parallel region").  Each
rank's latent parameters then get exactly their slice of the unsharded gradient.  ``b_dec``
enters twice: in the reconstruction (counted once, on rank 0: the other ranks subtract it from
their partial) and in every rank's encoder (the centring x − b_dec), so its full gradient is the
*sum* of the ranks' gradients: :meth:`ShardedJumpReLUSAE.reduce_grads` all-reduces it, and is
the ``reduce_grads`` hook to give :class:`~saescope.train.sae_trainer.SAETrainer`.  The decoder
rule (row norms, row-wise gradient projection), Adam and the θ clamp act per latent, hence
locally.  Memory and FLOPs per rank: 1/W of the unsharded SAE's, plus a B×D all-reduce per step.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from saescope.sae.base import LossOutput
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE


class _SumOverShards(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group.  Backward: identity (see module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def shard_bounds(d_sae: int, rank: int, world_size: int) -> tuple[int, int]:
    """The latents ``[lo, hi)`` rank ``rank`` holds; ``d_sae`` must divide evenly."""
    if d_sae % world_size:
        raise ValueError(f"d_sae = {d_sae} latents do not split evenly over {world_size} ranks")
    n = d_sae // world_size
    return rank * n, (rank + 1) * n


class ShardedJumpReLUSAE(JumpReLUSAE):
    """Rank ``rank``'s slice of a JumpReLU SAE of ``cfg.d_sae`` latents (see module docstring).

    ``self.cfg`` describes the local shard (``d_sae`` = its latents), ``full_cfg`` the whole SAE.
    :meth:`encode` returns this rank's latents; :meth:`decode`, :meth:`forward` and :meth:`loss`
    return full reconstructions (collectives: every rank of ``group`` must call them together).
    A freshly built shard holds exactly the slice of the unsharded SAE built from the same RNG
    state, so a sharded run starts where a single-device one would.
    """

    def __init__(self, cfg: JumpReLUConfig, *, rank: int, world_size: int, group=None, step_path: str = "auto"):
        # Plain attributes read by reset_parameters(), which the base constructor calls.
        self.full_cfg = cfg
        self.shard_rank, self.shard_world_size, self.group = rank, world_size, group
        self.latent_lo, self.latent_hi = shard_bounds(cfg.d_sae, rank, world_size)
        super().__init__(replace(cfg, d_sae=self.latent_hi - self.latent_lo), step_path=step_path)

    @torch.no_grad()
    def mean_l0(self, x_BD: torch.Tensor) -> float:
        """The whole SAE's L0: this shard's firing counts summed over the group."""
        local = (self.encode(x_BD) != 0).sum(-1).double().mean()
        return float(_SumOverShards.apply(local, self.group))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gemma Scope's init, sliced: the full W_dec is drawn in row blocks from one stream (never
        all in memory), keeping this rank's rows; bound √(6/F) uses the full width."""
        F, D = self.full_cfg.d_sae, self.full_cfg.d_in
        bound = (6.0 / F) ** 0.5
        block = max(1, (1 << 24) // D)  # ~64 MB of float32 per block
        for start in range(0, self.latent_hi, block):
            stop = min(start + block, self.latent_hi)
            rows = torch.empty(stop - start, D).uniform_(-bound, bound, generator=generator)
            lo, hi = max(start, self.latent_lo), stop
            if lo < hi:
                self.W_dec[lo - self.latent_lo : hi - self.latent_lo].copy_(rows[lo - start : hi - start])
        self.normalize_decoder_()
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # --- conversion -----------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: JumpReLUSAE, *, rank: int, world_size: int, group=None) -> ShardedJumpReLUSAE:
        """This rank's slice of an existing (unsharded) SAE, on the SAE's device."""
        lo, hi = shard_bounds(sae.cfg.d_sae, rank, world_size)
        with torch.device("meta"):
            shard = cls(replace(sae.cfg), rank=rank, world_size=world_size, group=group, step_path=sae.step_path)
        shard = shard.to_empty(device=sae.W_enc.device)
        shard.W_enc.copy_(sae.W_enc[:, lo:hi])
        shard.W_dec.copy_(sae.W_dec[lo:hi])
        shard.b_enc.copy_(sae.b_enc[lo:hi])
        shard.threshold.copy_(sae.threshold[lo:hi])
        shard.tokens_since_fired_F.copy_(sae.tokens_since_fired_F[lo:hi])
        if hasattr(sae, "frequency_F"):
            shard.frequency_F.copy_(sae.frequency_F[lo:hi])
            shard.frequency_batches.copy_(sae.frequency_batches)
        shard.b_dec.copy_(sae.b_dec)
        return shard

    @torch.no_grad()
    def gather_full(self, dst: int = 0) -> JumpReLUSAE | None:
        """The whole SAE, assembled on rank ``dst`` (on the CPU); None on the other ranks.

        Every rank must call it.  Used to release a sharded SAE in the usual one-folder format.
        """
        full_cfg = replace(self.full_cfg, centre_input=self.cfg.centre_input)
        parts = {name: self.gather_latents(getattr(self, name), dim, dst)
                 for name, dim in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0), ("threshold", 0),
                                  ("tokens_since_fired_F", 0))}
        if self.shard_rank != dst:
            return None
        with torch.device("meta"):
            sae = JumpReLUSAE(full_cfg, step_path=self.step_path)
        sae = sae.to_empty(device="cpu")
        for name, value in parts.items():
            getattr(sae, name).copy_(value)
        sae.b_dec.copy_(self.b_dec.detach().cpu())
        return sae

    def gather_latents(self, t: torch.Tensor, dim: int = -1, dst: int | None = None) -> torch.Tensor | None:
        """Concatenate every rank's slice of ``t`` along its latent dimension ``dim`` (on the CPU).
        ``dst=None``: every rank gets the result; otherwise only rank ``dst`` (the others: None)."""
        t = t.detach().contiguous()
        if not (dist.is_initialized() and dist.get_world_size(self.group) > 1):
            return t.cpu()
        # NCCL collectives need the tensor on this rank's GPU; gloo takes CPU tensors.
        on_device = dist.get_backend(self.group) == "nccl"
        t = t if on_device else t.cpu()
        parts = [torch.empty_like(t) for _ in range(self.shard_world_size)]
        if dst is None:
            dist.all_gather(parts, t, group=self.group)
        else:
            dist.gather(t, parts if self.shard_rank == dst else None, dst=dst, group=self.group)
            if self.shard_rank != dst:
                return None
        return torch.cat([p.cpu() for p in parts], dim=dim)

    # --- maths ------------------------------------------------------------------------------

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Full reconstruction from this rank's latents ``f_BF`` (B, F/W): Σ over ranks."""
        part_BD = f_BF @ self.W_dec
        if self.shard_rank == 0:
            part_BD = part_BD + self.b_dec
        return _SumOverShards.apply(part_BD, self.group)

    def loss(self, x_BD: torch.Tensor, sparsity_coefficient: float) -> LossOutput:
        """Exactly :meth:`JumpReLUSAE.loss` of the unsharded SAE; ``fired_F`` covers this shard."""
        part_BD, l0_part_B, fired_F = self.step(x_BD)
        if self.shard_rank != 0:  # the fused step adds b_dec; only rank 0's copy counts
            part_BD = part_BD - self.b_dec
        x_hat_BD = _SumOverShards.apply(part_BD, self.group)
        l0_B = _SumOverShards.apply(l0_part_B, self.group)  # each token's L0 over every shard's latents
        # the frequency penalty is per latent, so each rank's share acts on its own θ alone
        return self.objective(x_BD, x_hat_BD, l0_B, fired_F, sparsity_coefficient)

    @torch.no_grad()
    def reduce_grads(self, sae: ShardedJumpReLUSAE | None = None) -> None:
        """Sum ``b_dec``'s gradient over the ranks (its other gradients are already exact).
        Signature fits :class:`~saescope.train.sae_trainer.SAETrainer`'s ``reduce_grads`` hook."""
        grad = self.b_dec.grad
        if grad is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(grad, group=self.group)
