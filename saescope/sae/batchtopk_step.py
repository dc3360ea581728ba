"""The BatchTopK training step — encoder, batch-level top-k, decoder — as ONE autograd Function.

Maths (shapes B batch, D d_in, F d_sae)::

    π = x·W_enc + (b_enc − b_dec·W_enc)        # = (x − b_dec)·W_enc + b_enc, training form
    t = the (k·B)-th largest of ReLU(π) over the whole batch
    f = π · 1[π ≥ t]                            # the k·B largest activations (BatchTopK)
    x̂ = f·W_dec + b_dec

∂f/∂π = 1[π ≥ t] (the selection is piecewise constant), so the gradients are those of a JumpReLU
whose threshold is t for every latent, with no threshold gradient.  Written with autograd, the
same step costs six matrix products (one for the centred input's gradient, which only b_dec's
gradient needs, as a vector) and a dozen B×F temporaries and casts; here it is the five products
of the 10·D·F FLOPs-per-token bound, on scratch buffers pooled across steps and SAEs
(:mod:`saescope.sae.workspace`).  Measured on 2 cores at B 1,024, D 640, F 2,048, bf16 autocast:
about 2.5× faster than the autograd step (benchmarks/train_step.py --arch batchtopk).  On a CPU
in float32 the code is kept sparse instead (:class:`_SparseBatchTopKStep`: one dense product;
benchmarks/batchtopk_step.py).

The cut t is found exactly: a strided sample of π gives a value just below t, the ~1.5·k·B
entries above it are ranked, and t is the smallest kept one.  Ties at t keep every tied entry
(measure zero in real data).  The products run in 16 bits under ``torch.autocast`` (weights,
biases, the cut and every gradient stay fp32).
"""

from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F_nn

from saescope.sae.workspace import POOL, step_precision

#: the cut is read off a strided sample of about this many pre-activations
_SAMPLE = 2**16


def batchtopk_step(
    x_BD: torch.Tensor,
    W_enc_DF: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    b_dec_D: torch.Tensor,
    k: int,
    *,
    centre_input: bool = True,
    sparse: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(x_hat_BD, fired_F, cut)``: the reconstruction (differentiable w.r.t. the four
    parameters), the per-latent firing counts (int64) and the smallest kept activation (a 0-d
    fp32 tensor; BatchTopK's inference threshold is estimated from it).

    ``sparse``: run the four products that touch the code sparsely (None: on a CPU in float32,
    where that is 1.2–1.8× faster; under 16-bit autocast or on a GPU the dense products win)."""
    device_type, low_dtype = step_precision(x_BD, W_enc_DF)
    if sparse is None:
        sparse = device_type == "cpu" and low_dtype is None
    with torch.autocast(device_type, enabled=False):
        if sparse:
            return _SparseBatchTopKStep.apply(x_BD.float(), W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, int(k),
                                              bool(centre_input))
        x_hat_BD, fired_F, cut = _BatchTopKStep.apply(x_BD.float(), W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, int(k),
                                                      bool(centre_input), low_dtype)
    return x_hat_BD, fired_F, cut


def batch_cut(pre_BF: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep``-th largest entry of ``pre_BF`` (0-d tensor), exactly: a cut read off a
    strided sample leaves ~1.5·n_keep candidates, and only those are ranked."""
    flat = pre_BF.reshape(-1)
    n = flat.numel()
    if n_keep >= n:
        return flat.min()
    if n_keep * 8 <= n and n >= 2 * _SAMPLE:
        sample = flat[:: n // _SAMPLE]
        rank = max(1, int(sample.numel() * (1 - 1.5 * n_keep / n)))
        candidates = flat[flat > sample.kthvalue(rank).values]
        if candidates.numel() >= n_keep:
            return candidates.kthvalue(candidates.numel() - n_keep + 1).values
    return flat.kthvalue(n - n_keep + 1).values


class _BatchTopKStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, k, centre_input, low_dtype):
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        device = x_BD.device
        lease = POOL.acquire((device, B, F))
        bias_F = b_enc_F - b_dec_D @ W_enc_DF if centre_input else b_enc_F
        pre_BF = lease.get("pre", (B, F), torch.float32, device)
        low = {}
        if low_dtype is None:
            torch.addmm(bias_F, x_BD, W_enc_DF, out=pre_BF)
        else:
            low["x"], low["W_enc"], low["W_dec"] = x_BD.to(low_dtype), W_enc_DF.to(low_dtype), W_dec_FD.to(low_dtype)
            scores_BF = torch.mm(low["x"], low["W_enc"], out=lease.get("low", (B, F), low_dtype, device))
            torch.add(scores_BF, bias_F, out=pre_BF)
        # the k·B largest of ReLU(π): a non-positive cut means fewer positives than k·B, and
        # then every positive one is kept
        cut = batch_cut(pre_BF, min(k * B, B * F)).clamp_min(torch.finfo(torch.float32).tiny)
        active_BF = torch.ge(pre_BF, cut, out=lease.get("active", (B, F), torch.float32, device))  # 0/1
        fired_F = active_BF.sum(0).to(torch.int64)
        f_BF = pre_BF.mul_(active_BF)
        if low_dtype is None:
            x_hat_BD = torch.addmm(b_dec_D, f_BF, W_dec_FD)
        else:
            f_low_BF = lease.get("low", (B, F), low_dtype, device).copy_(f_BF)
            x_hat_BD = torch.addmm(b_dec_D.to(low_dtype), f_low_BF, low["W_dec"]).float()
        ctx.lease, ctx.low, ctx.low_dtype, ctx.centre_input = lease, low, low_dtype, centre_input
        ctx.save_for_backward(x_BD, W_enc_DF, W_dec_FD, b_dec_D)
        ctx.mark_non_differentiable(fired_F, cut)
        return x_hat_BD, fired_F, cut

    @staticmethod
    def backward(ctx, g_BD, _grad_fired, _grad_cut):
        x_BD, W_enc_DF, W_dec_FD, b_dec_D = ctx.saved_tensors
        lease, low, low_dtype = ctx.lease, ctx.low, ctx.low_dtype
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        device = x_BD.device
        if g_BD is None:
            g_BD = torch.zeros_like(x_BD)
        with torch.autocast(device.type, enabled=False):
            buf_BF = lease.get("pre", (B, F), torch.float32, device)  # holds f
            active_BF = lease.get("active", (B, F), torch.float32, device)
            if low_dtype is None:
                grad_W_dec_FD = buf_BF.T @ g_BD
                torch.mm(g_BD, W_dec_FD.T, out=buf_BF)  # ∂L/∂f
                grad_pre_BF = buf_BF.mul_(active_BF)
                x_aug_BD1 = torch.cat([x_BD, x_BD.new_ones(B, 1)], 1)
                grad_aug_D1F = x_aug_BD1.T @ grad_pre_BF
            else:
                low_BF = lease.get("low", (B, F), low_dtype, device)  # holds f in 16 bits
                g_low_BD = g_BD.to(low_dtype)
                grad_W_dec_FD = (low_BF.T @ g_low_BD).float()
                torch.mm(g_low_BD, low["W_dec"].T, out=low_BF)
                torch.mul(low_BF, active_BF, out=buf_BF)  # ∂L/∂π in fp32 …
                low_BF.copy_(buf_BF)  # … and in 16 bits for the product
                # a column of ones under x makes the same product give Σ_b ∂L/∂π (b_enc's gradient)
                x_aug_BD1 = torch.cat([low["x"], low["x"].new_ones(B, 1)], 1)
                grad_aug_D1F = (x_aug_BD1.T @ low_BF).float()
            lease.release()
            grad_W_enc_DF, grad_bias_F = grad_aug_D1F[:-1], grad_aug_D1F[-1].clone()
            grad_b_dec_D = g_BD.sum(0)
            if ctx.centre_input:  # π's bias is b_enc − b_dec·W_enc
                grad_b_dec_D = grad_b_dec_D - W_enc_DF @ grad_bias_F
                grad_W_enc_DF.addr_(b_dec_D, grad_bias_F, alpha=-1.0)
        return None, grad_W_enc_DF.contiguous(), grad_W_dec_FD, grad_bias_F, grad_b_dec_D, None, None, None


class _SparseBatchTopKStep(torch.autograd.Function):
    """The same step with the code held sparsely (k·B of B·F entries, ~5% for the CPU presets):
    only the encoder product is dense.  The decoder is an ``embedding_bag`` over each row's kept
    latents; W_dec's and W_enc's gradients are latent-major sparse × dense products; ∂L/∂π is
    sampled at the kept entries only (``sampled_addmm``).  Measured on 2 AVX2 cores, fp32, D 640,
    F 2,048: 100 → 62 ms at B 1,024, k 100; 58 → 47 ms at B 512, k 140; D 1,024, k 85: 185 → 102 ms."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, k, centre_input):
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        device = x_BD.device
        lease = POOL.acquire((device, B, F))
        bias_F = b_enc_F - b_dec_D @ W_enc_DF if centre_input else b_enc_F
        pre_BF = torch.addmm(bias_F, x_BD, W_enc_DF, out=lease.get("pre", (B, F), torch.float32, device))
        cut = batch_cut(pre_BF, min(k * B, B * F)).clamp_min(torch.finfo(torch.float32).tiny)
        kept = torch.ge(pre_BF, cut).nonzero()  # row-major: the code's CSR order
        rows, cols = kept[:, 0].contiguous(), kept[:, 1].contiguous()
        values = pre_BF[rows, cols]
        lease.release()  # the backward needs only the kept entries
        row_ptr = torch.zeros(B + 1, dtype=torch.int64, device=device)
        torch.cumsum(torch.bincount(rows, minlength=B), 0, out=row_ptr[1:])
        fired_F = torch.bincount(cols, minlength=F)
        # gathers need W_dec's rows contiguous (a strided W_dec makes embedding_bag ~50× slower)
        x_hat_BD = F_nn.embedding_bag(cols, W_dec_FD.detach().contiguous(), row_ptr[:-1], mode="sum",
                                      per_sample_weights=values).add_(b_dec_D)
        # the latent-major (transposed) structure, once, for both weight gradients
        order = torch.argsort(cols, stable=True)
        col_ptr = torch.zeros(F + 1, dtype=torch.int64, device=device)
        torch.cumsum(fired_F, 0, out=col_ptr[1:])
        ctx.centre_input = centre_input
        ctx.save_for_backward(x_BD, W_enc_DF, W_dec_FD, b_dec_D, row_ptr, rows, cols, values, order, col_ptr)
        ctx.mark_non_differentiable(fired_F, cut)
        return x_hat_BD, fired_F, cut

    @staticmethod
    def backward(ctx, g_BD, _grad_fired, _grad_cut):
        x_BD, W_enc_DF, W_dec_FD, b_dec_D, row_ptr, rows, cols, values, order, col_ptr = ctx.saved_tensors
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        if g_BD is None:
            g_BD = torch.zeros_like(x_BD)
        g_BD = g_BD.contiguous()
        with torch.autocast(g_BD.device.type, enabled=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "sparse CSR support is in beta" notices
            rows_by_latent = rows[order]
            f_FB = torch.sparse_csr_tensor(col_ptr, rows_by_latent, values[order], (F, B))
            grad_W_dec_FD = f_FB @ g_BD
            pattern_BF = torch.sparse_csr_tensor(row_ptr, cols, torch.zeros_like(values), (B, F))
            grad_values = torch.sparse.sampled_addmm(pattern_BF, g_BD, W_dec_FD.detach().T, beta=0.0).values()
            grad_pre_FB = torch.sparse_csr_tensor(col_ptr, rows_by_latent, grad_values[order], (F, B))
            grad_W_enc_DF = (grad_pre_FB @ x_BD).T.contiguous()
            grad_bias_F = torch.zeros(F, dtype=torch.float32, device=x_BD.device).index_add_(0, cols, grad_values)
            grad_b_dec_D = g_BD.sum(0)
            if ctx.centre_input:  # π's bias is b_enc − b_dec·W_enc
                grad_b_dec_D = grad_b_dec_D - W_enc_DF @ grad_bias_F
                grad_W_enc_DF.addr_(b_dec_D, grad_bias_F, alpha=-1.0)
        return None, grad_W_enc_DF, grad_W_dec_FD, grad_bias_F, grad_b_dec_D, None, None
