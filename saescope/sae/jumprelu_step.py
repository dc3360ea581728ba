"""The JumpReLU training step — encoder, JumpReLU + L0, decoder — as ONE autograd Function.

Maths (Gemma Scope / Rajamanoharan et al. 2024; shapes B batch, D d_in, F d_sae)::

    π = x·W_enc + (b_enc − b_dec·W_enc)       # = (x − b_dec)·W_enc + b_enc, training form
    f = π · H(π − θ)                           # JumpReLU
    x̂ = f·W_dec + b_dec
    l0 = (1/B) Σ_b Σ_i H(π_bi − θ_i)
    l0_b = Σ_i H(π_bi − θ_i)                   # per token (``counts=True``)
    c_i  = Σ_b H(π_bi − θ_i)                   # per latent (``counts=True``)

Backward, rectangle kernel K(u) = 1[−½ < u < ½], bandwidth ε (pseudo-derivatives):

* ∂f/∂π = H(π − θ);  ∂l0/∂π = 0 (no straight-through gradient reaches π from the L0 term);
* ∂f/∂θ = −(θ/ε)·K((π − θ)/ε);  ∂H(π − θ)/∂θ = −(1/ε)·K((π − θ)/ε), summed over the batch.
* so for any penalty G(l0_b, c_i) built from the counts (Gemma Scope 2's per-token quadratic
  around a target L0, a penalty on frequent latents):
  ∂G/∂θ_i = −(1/ε)·[Σ_b ∂G/∂l0_b·K((π_bi − θ_i)/ε) + ∂G/∂c_i·Σ_b K((π_bi − θ_i)/ε)].
  Only the (token, latent) pairs inside θ's window enter, which the step keeps as indices anyway.
* ``counts_straight_through=True``: the per-latent counts' gradient also reaches π, by the
  kernel's straight-through estimate ∂c_i/∂π_bi = +(1/ε)·K((π_bi − θ_i)/ε) (the per-token L0's
  never does: Gemma Scope's rule).  The frequency penalty needs it: acting on θ alone, Adam moves
  b_enc up as fast as it moves θ up (both ~lr per step) and a useful dense latent keeps firing.

Why one Function instead of autograd over small ops: autograd would keep π, the mask, f, the
kernel and several products as separate B×F tensors, and compute a sixth matrix product (the
gradient of the centred input, which nobody needs).  Here:

* the encoder bias absorbs the centring (``b_enc − b_dec·W_enc``), so no input gradient is formed
  and the cost is the five products of the 10·D·F FLOPs-per-token bound;
* the B×F scratch (π, overwritten in place by f, then by ∂L/∂f, then by ∂L/∂π) comes from a
  pool reused across steps and SAEs (:mod:`saescope.sae.workspace`);
* the active mask is kept as 0/1 floats in a second pooled buffer (on CPU a float compare and
  a float column sum are ~2.5× faster than their bool versions), and the threshold window —
  the only place the θ-gradient lives — is stored compactly as the indices of its few entries.

Two paths compute the same gradients:

``dense``  five dense matrix products (always right; best when many latents fire, e.g. at init);
``sparse`` only the encoder product is dense.  At L0 ≈ 50–100 of 16,384 latents the decoder
           forward, ∂L/∂W_dec and ∂L/∂W_enc touch only the active latents, and ∂L/∂f is needed
           only where a latent is active or in θ's window (a sampled matrix product).
``auto``   (default) chooses per step: sparse when fewer than :data:`SPARSE_DENSITY` of the
           (token, latent) pairs lie above θ − ε/2 (3 % in fp32, 1 % in bf16; tiny steps stay
           dense).

Under ``torch.autocast`` with a 16-bit dtype the dense products run in that dtype (the master
weights, θ, the threshold comparisons and every gradient stay fp32); the sparse path runs its
encoder product in 16 bits and its gather/scatter products in fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as nnf

from saescope.sae.workspace import POOL, step_precision

PATHS = ("auto", "dense", "sparse")
#: ``auto`` takes the sparse path below this fraction of (token, latent) pairs with π > θ − ε/2 …
#: The break-even does not depend on d_in or the width (both paths scale with them alike), but
#: on how much faster dense products are than gathers: 16-bit products are ~5× faster on AMX
#: CPUs, so they stay dense down to a lower density.  Estimated with benchmarks/train_step.py
#: (``--target-l0`` sweep) on a 2-thread Xeon: fp32 ~3 %, bf16 ~1 %.
SPARSE_DENSITY = {None: 0.03, torch.bfloat16: 0.01, torch.float16: 0.01}
#: … and only for steps of at least this many (token, latent) pairs (below, per-op overhead wins)
SPARSE_MIN_SIZE = 2**20


def jumprelu_step(
    x_BD: torch.Tensor,
    W_enc_DF: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    b_dec_D: torch.Tensor,
    threshold_F: torch.Tensor,
    *,
    bandwidth: float,
    centre_input: bool = True,
    path: str = "auto",
    counts: bool = False,
    counts_straight_through: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(x_hat_BD, l0, fired_F)``: the reconstruction, the L0 term (mean active latents
    per token, differentiable w.r.t. θ only), and per-latent firing counts (int64, no grad).

    ``counts=True`` returns ``(x_hat_BD, l0_B, fired_F)`` instead, with both counts float32 and
    differentiable w.r.t. θ by the pseudo-derivative: ``l0_B`` (B,) the active latents of each
    token, ``fired_F`` (F,) the tokens each latent fires on (what per-token and per-latent
    penalties need; ``l0_B.mean()`` is the plain L0 term, with the same gradient).
    ``counts_straight_through``: ``fired_F``'s gradient also reaches π (module docstring)."""
    if path not in PATHS:
        raise ValueError(f"unknown JumpReLU step path {path!r}; use one of {', '.join(PATHS)}")
    device_type, low_dtype = step_precision(x_BD, W_enc_DF)
    with torch.autocast(device_type, enabled=False):
        x_hat_BD, l0, fired_F, l0_B, counts_F = _JumpReLUStep.apply(
            x_BD.float(), W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, threshold_F,
            float(bandwidth), bool(centre_input), path, low_dtype, bool(counts_straight_through),
        )
    return (x_hat_BD, l0_B, counts_F) if counts else (x_hat_BD, l0, fired_F)


class _JumpReLUStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, W_dec_FD, b_enc_F, b_dec_D, threshold_F, bandwidth, centre_input, path, low_dtype,
                straight_through):
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        device, half = x_BD.device, bandwidth / 2
        lease = POOL.acquire((device, B, F))
        bias_F = b_enc_F - b_dec_D @ W_enc_DF if centre_input else b_enc_F
        low = {}
        # scores: π itself (fp32), or π − bias in 16 bits (the bias is added in fp32 later)
        if low_dtype is None:
            scores_BF = torch.addmm(bias_F, x_BD, W_enc_DF, out=lease.get("pre", (B, F), torch.float32, device))
            window_start_F = threshold_F - half
        else:
            low["x"], low["W_enc"] = x_BD.to(low_dtype), W_enc_DF.to(low_dtype)
            scores_BF = torch.mm(low["x"], low["W_enc"], out=lease.get("low", (B, F), low_dtype, device))
            window_start_F = _round_down(threshold_F - half - bias_F, low_dtype)

        # the sparse set: π > θ − ε/2 (a superset of it in 16 bits; exact tests follow in fp32)
        window_BF = lease.get("window", (B, F), torch.bool, device)
        sparse, n_sampled = path == "sparse", 0
        if path == "auto" and B * F >= SPARSE_MIN_SIZE:  # tiny "auto" steps stay dense
            n_sampled = min(B, 512)  # the batch is shuffled: its first rows tell the density
            sample_BF = torch.gt(scores_BF[:n_sampled], window_start_F, out=window_BF[:n_sampled])
            sparse = int(torch.count_nonzero(sample_BF)) < SPARSE_DENSITY[low_dtype] * sample_BF.numel()
        if sparse:
            torch.gt(scores_BF[n_sampled:], window_start_F, out=window_BF[n_sampled:])

        ctx.sparse, ctx.bandwidth, ctx.centre_input, ctx.low_dtype = sparse, bandwidth, centre_input, low_dtype
        ctx.straight_through = straight_through
        ctx.device_type = device.type
        ctx.save_for_backward(x_BD, W_enc_DF, W_dec_FD, b_dec_D, threshold_F)
        if sparse:
            low_bias_F = bias_F if low_dtype is not None else None  # 16-bit scores lack the bias
            x_hat_BD, fired_F, l0_B = _sparse_forward(ctx, scores_BF, window_BF, low_bias_F, W_dec_FD, b_dec_D,
                                                      threshold_F, half)
            lease.release()  # everything the backward needs is in compact index form now
        else:
            if low_dtype is not None:  # π in fp32
                scores_BF = lease.get("pre", (B, F), torch.float32, device).copy_(scores_BF).add_(bias_F)
            x_hat_BD, fired_F, l0_B = _dense_forward(ctx, lease, scores_BF, window_BF, W_dec_FD, b_dec_D, threshold_F,
                                                     half, low)
            ctx.lease = lease
        ctx.mark_non_differentiable(fired_F)
        l0 = fired_F.sum().to(torch.float32) / B
        return x_hat_BD, l0, fired_F, l0_B, fired_F.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_x_hat_BD, grad_l0, _grad_fired, grad_l0_B, grad_counts_F):
        x_BD, W_enc_DF, W_dec_FD, b_dec_D, threshold_F = ctx.saved_tensors
        B, F = x_BD.shape[0], W_enc_DF.shape[1]
        if grad_x_hat_BD is None:
            grad_x_hat_BD = torch.zeros_like(x_BD)
        grad_l0 = 0.0 if grad_l0 is None else grad_l0
        # ∂c_i/∂π_bi = (1/ε)·K at θ_i's window, when the counts' gradient goes straight through
        pre_F = grad_counts_F / ctx.bandwidth if ctx.straight_through and grad_counts_F is not None else None
        with torch.autocast(ctx.device_type, enabled=False):
            if ctx.sparse:
                grads = _sparse_backward(ctx, grad_x_hat_BD, x_BD, W_enc_DF, W_dec_FD, F, pre_F)
            else:
                grads = _dense_backward(ctx, grad_x_hat_BD, x_BD, W_enc_DF, W_dec_FD, B, F, pre_F)
                ctx.lease.release()
        grad_x_BD, grad_W_enc_DF, grad_W_dec_FD, grad_bias_F, near_grad_f_F, near_count_F, near_rows, near_cols = grads

        eps = ctx.bandwidth
        grad_threshold_F = -(threshold_F / eps) * near_grad_f_F - (grad_l0 / (eps * B)) * near_count_F
        if grad_counts_F is not None:  # ∂c_i/∂θ_i = −(1/ε)·(tokens in θ_i's window)
            grad_threshold_F = grad_threshold_F - grad_counts_F * near_count_F / eps
        if grad_l0_B is not None:  # ∂l0_b/∂θ_i = −(1/ε)·K((π_bi − θ_i)/ε): the window's own tokens
            grad_threshold_F = grad_threshold_F.index_add(0, near_cols, grad_l0_B[near_rows], alpha=-1 / eps)
        grad_b_dec_D = grad_x_hat_BD.sum(0)
        if ctx.centre_input:  # π's bias is b_enc − b_dec·W_enc
            grad_b_dec_D = grad_b_dec_D - W_enc_DF @ grad_bias_F
            if grad_W_enc_DF is not None:
                grad_W_enc_DF.addr_(b_dec_D, grad_bias_F, alpha=-1.0)
        return (grad_x_BD, grad_W_enc_DF, grad_W_dec_FD, grad_bias_F, grad_b_dec_D, grad_threshold_F,
                None, None, None, None, None)


# --- dense path ---------------------------------------------------------------------------------


def _dense_forward(ctx, lease, pre_BF, window_BF, W_dec_FD, b_dec_D, threshold_F, half, low):
    B, F = pre_BF.shape
    device = pre_BF.device
    # θ's window |π − θ| < ε/2, kept as indices (a few % of the pairs at most); the scratch for
    # |π − θ| becomes the active mask next
    scratch_BF = torch.sub(pre_BF, threshold_F, out=lease.get("active", (B, F), torch.float32, device)).abs_()
    ctx.near_rows, ctx.near_cols = torch.lt(scratch_BF, half, out=window_BF).nonzero(as_tuple=True)
    active_BF = torch.gt(pre_BF, threshold_F, out=lease.get("active", (B, F), torch.float32, device))  # 0/1
    fired_F = active_BF.sum(0).to(torch.int64)
    l0_B = active_BF.sum(1)
    f_BF = pre_BF.mul_(active_BF)
    if ctx.low_dtype is None:
        x_hat_BD = torch.addmm(b_dec_D, f_BF, W_dec_FD)
    else:
        f_low_BF = lease.get("low", (B, F), ctx.low_dtype, device).copy_(f_BF)
        low["W_dec"] = W_dec_FD.to(ctx.low_dtype)
        x_hat_BD = torch.addmm(b_dec_D.to(ctx.low_dtype), f_low_BF, low["W_dec"]).float()
    ctx.low = low
    return x_hat_BD, fired_F, l0_B


def _dense_backward(ctx, g_BD, x_BD, W_enc_DF, W_dec_FD, B, F, near_pre_F=None):
    lease, low, low_dtype = ctx.lease, ctx.low, ctx.low_dtype
    device = x_BD.device
    buf_BF = lease.get("pre", (B, F), torch.float32, device)  # holds f
    active_BF = lease.get("active", (B, F), torch.float32, device)
    need_x, need_W_enc, need_W_dec = ctx.needs_input_grad[:3]
    grad_W_dec_FD = None
    if low_dtype is None:
        if need_W_dec:
            grad_W_dec_FD = buf_BF.T @ g_BD
        torch.mm(g_BD, W_dec_FD.T, out=buf_BF)  # ∂L/∂f
    else:
        low_BF = lease.get("low", (B, F), low_dtype, device)  # holds f in 16 bits
        g_low_BD = g_BD.to(low_dtype)
        if need_W_dec:
            grad_W_dec_FD = (low_BF.T @ g_low_BD).float()
        torch.mm(g_low_BD, low["W_dec"].T, out=low_BF)
        buf_BF.copy_(low_BF)
    near_grad_f_F = torch.zeros(F, device=device).index_add_(0, ctx.near_cols, buf_BF[ctx.near_rows, ctx.near_cols])
    near_count_F = torch.bincount(ctx.near_cols, minlength=F).to(torch.float32)
    grad_pre_BF = buf_BF.mul_(active_BF)
    if near_pre_F is not None:  # straight-through counts: extra ∂L/∂π at θ's window
        grad_pre_BF.index_put_((ctx.near_rows, ctx.near_cols), near_pre_F[ctx.near_cols], accumulate=True)
    if low_dtype is not None:
        low_BF.copy_(grad_pre_BF)
    grad_W_enc_DF = grad_x_BD = None
    if need_W_enc:
        # a column of ones under x makes the same product give Σ_b ∂L/∂π (b_enc's gradient)
        x_aug_BD1 = torch.cat([x_BD if low_dtype is None else low["x"], x_BD.new_ones(B, 1, dtype=low_dtype or x_BD.dtype)], 1)
        grad_aug_D1F = x_aug_BD1.T @ (grad_pre_BF if low_dtype is None else low_BF)
        grad_aug_D1F = grad_aug_D1F.float() if low_dtype is not None else grad_aug_D1F
        grad_W_enc_DF, grad_bias_F = grad_aug_D1F[:-1], grad_aug_D1F[-1].clone()
    else:
        grad_bias_F = grad_pre_BF.sum(0)
    if need_x:
        grad_x_BD = grad_pre_BF @ W_enc_DF.T if low_dtype is None else (low_BF @ low["W_enc"].T).float()
    return grad_x_BD, grad_W_enc_DF, grad_W_dec_FD, grad_bias_F, near_grad_f_F, near_count_F, ctx.near_rows, ctx.near_cols


# --- sparse path --------------------------------------------------------------------------------


def _round_down(values_F: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values_F`` in ``dtype``, rounded so that no entry ends up above its fp32 value."""
    margin_F = values_F.abs() * 2.0**-6 + 2.0**-24  # > half a 16-bit ulp (2⁻⁹ relative for bf16)
    return (values_F - margin_F).to(dtype)


def _offsets(sorted_index: torch.Tensor, n: int) -> torch.Tensor:
    """Start of each group 0..n−1 in a sorted index vector (embedding_bag's ``offsets``)."""
    return torch.searchsorted(sorted_index, torch.arange(n, device=sorted_index.device, dtype=sorted_index.dtype))


def _sparse_forward(ctx, scores_BF, window_BF, low_bias_F, W_dec_FD, b_dec_D, threshold_F, half):
    B, F = scores_BF.shape
    flat = window_BF.view(-1).nonzero().squeeze(1)  # every π > θ − ε/2, row-major (CSR) order
    rows, cols = flat.div(F, rounding_mode="floor"), flat.remainder(F)
    pre_S = scores_BF.view(-1).take(flat)
    if low_bias_F is not None:  # 16-bit scores: add the bias in fp32; the tests below are exact
        pre_S = pre_S.float().add_(low_bias_F[cols])  # (pairs of the 16-bit superset that fail
    threshold_S = threshold_F[cols]  # both tests only cost a little sampled-product work)
    active_S = pre_S > threshold_S
    near_S = (pre_S - threshold_S).abs_() < half
    (active_idx,) = active_S.nonzero(as_tuple=True)
    a_rows, a_cols, a_vals = rows[active_idx], cols[active_idx], pre_S[active_idx]
    x_hat_BD = nnf.embedding_bag(a_cols, W_dec_FD, _offsets(a_rows, B), mode="sum", per_sample_weights=a_vals)
    x_hat_BD += b_dec_D
    (ctx.near_idx,) = near_S.nonzero(as_tuple=True)
    ctx.rows, ctx.cols, ctx.active_idx = rows, cols, active_idx
    ctx.a_rows, ctx.a_cols, ctx.a_vals = a_rows, a_cols, a_vals
    return x_hat_BD, torch.bincount(a_cols, minlength=F), torch.bincount(a_rows, minlength=B).to(torch.float32)


def _sampled_grad_f(g_BD, W_dec_FD, rows, cols, B, F):
    """∂L/∂f at the listed (token, latent) pairs only: a sampled dense-dense product."""
    crow = _offsets(rows, B + 1)  # CSR row pointers (the last one is nnz)
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(rows.numel(), device=g_BD.device), (B, F))
        return torch.sparse.sampled_addmm(pattern, g_BD, W_dec_FD.T, beta=0.0).values()


def _sparse_backward(ctx, g_BD, x_BD, W_enc_DF, W_dec_FD, F, near_pre_F=None):
    B = x_BD.shape[0]
    grad_f_S = _sampled_grad_f(g_BD, W_dec_FD, ctx.rows, ctx.cols, B, F)
    near_rows, near_cols = ctx.rows[ctx.near_idx], ctx.cols[ctx.near_idx]
    near_grad_f_F = torch.zeros(F, device=g_BD.device).index_add_(0, near_cols, grad_f_S[ctx.near_idx])
    near_count_F = torch.bincount(near_cols, minlength=F).to(torch.float32)

    a_rows, a_cols = ctx.a_rows, ctx.a_cols
    grad_pre_A = grad_f_S[ctx.active_idx]  # ∂L/∂π at the active pairs (zero elsewhere)
    # ∂L/∂W_dec and ∂L/∂W_encᵀ are sums over each latent's active tokens: bags by latent
    by_latent = torch.argsort(a_cols.to(torch.int32), stable=True)  # int32 keys sort ~4× faster
    tokens_by_latent = a_rows[by_latent]
    latent_offsets = _offsets(a_cols[by_latent], F)
    # the encoder side: the active pairs, or (straight-through counts) every pair of the sparse set,
    # which holds θ's window too
    enc_rows, enc_cols, grad_pre_E = a_rows, a_cols, grad_pre_A
    enc_tokens, enc_offsets, enc_order = tokens_by_latent, latent_offsets, by_latent
    if near_pre_F is not None:
        grad_pre_E = torch.zeros_like(grad_f_S).index_copy_(0, ctx.active_idx, grad_pre_A)
        grad_pre_E.index_add_(0, ctx.near_idx, near_pre_F[near_cols])
        enc_rows, enc_cols = ctx.rows, ctx.cols
        enc_order = torch.argsort(enc_cols.to(torch.int32), stable=True)
        enc_tokens, enc_offsets = enc_rows[enc_order], _offsets(enc_cols[enc_order], F)
    grad_bias_F = torch.zeros(F, device=g_BD.device).index_add_(0, enc_cols, grad_pre_E)
    grad_W_dec_FD = grad_W_enc_DF = grad_x_BD = None
    if ctx.needs_input_grad[2]:
        grad_W_dec_FD = nnf.embedding_bag(
            tokens_by_latent, g_BD, latent_offsets, mode="sum", per_sample_weights=ctx.a_vals[by_latent]
        )
    if ctx.needs_input_grad[1]:
        grad_W_enc_FD = nnf.embedding_bag(
            enc_tokens, x_BD, enc_offsets, mode="sum", per_sample_weights=grad_pre_E[enc_order]
        )
        grad_W_enc_DF = grad_W_enc_FD.T.contiguous()
    if ctx.needs_input_grad[0]:
        grad_x_BD = nnf.embedding_bag(
            enc_cols, W_enc_DF.T.contiguous(), _offsets(enc_rows, B), mode="sum", per_sample_weights=grad_pre_E
        )
    return grad_x_BD, grad_W_enc_DF, grad_W_dec_FD, grad_bias_F, near_grad_f_F, near_count_F, near_rows, near_cols
