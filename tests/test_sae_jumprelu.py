"""JumpReLU SAE: the fused step against plain autograd and finite differences, the decoder-norm
rule, the fold into raw units, and recovery of a known sparse dictionary."""

from __future__ import annotations

import copy

import pytest
import torch

import saescope.sae.jumprelu_step as step_module
from saescope.sae.base import SAEConfig
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.jumprelu_step import jumprelu_step


pytestmark = pytest.mark.usefixtures("one_thread")

# --- a plain autograd reference, straight from the paper's equations --------------------------


class _RefJumpReLU(torch.autograd.Function):
    """f = π·H(π − θ); ∂f/∂π = H(π − θ), ∂f/∂θ = −(θ/ε)·K((π − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, eps):
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.eps / 2).to(pre)
        return grad * (pre > threshold), (-(threshold / ctx.eps) * kernel * grad).sum(0), None


class _RefStep(torch.autograd.Function):
    """H(π − θ); ∂H/∂π = 0, ∂H/∂θ = −(1/ε)·K((π − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre, threshold, eps):
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.eps / 2).to(pre)
        return torch.zeros_like(pre), (-(1 / ctx.eps) * kernel * grad).sum(0), None


def reference_loss(sae: JumpReLUSAE, x_BD: torch.Tensor, lam: float) -> torch.Tensor:
    centred = x_BD - sae.b_dec if sae.cfg.centre_input else x_BD
    pre = centred @ sae.W_enc + sae.b_enc
    f = _RefJumpReLU.apply(pre, sae.threshold, sae.cfg.bandwidth)
    x_hat = f @ sae.W_dec + sae.b_dec
    l0 = _RefStep.apply(pre, sae.threshold, sae.cfg.bandwidth).sum(-1).mean()
    return (x_hat - x_BD).pow(2).sum(-1).mean() + lam * l0


def random_sae(d_in=16, d_sae=96, bandwidth=0.05, step_path="auto", seed=0) -> JumpReLUSAE:
    torch.manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=d_sae, bandwidth=bandwidth), step_path=step_path)
    with torch.no_grad():
        sae.threshold.uniform_(0.2, 0.8)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    return sae


def grads_of(sae, loss) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("centre_input", [True, False])
def test_fused_step_matches_plain_autograd(path, centre_input):
    sae = random_sae(step_path=path)
    sae.cfg.centre_input = centre_input
    x = torch.randn(300, 16)
    out = sae.loss(x, 0.3)
    ours = grads_of(sae, out.total)
    ref_total = reference_loss(sae, x, 0.3)
    ref = grads_of(sae, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    assert ours["threshold"].abs().sum() > 0, "no pre-activation fell in θ's window; the test checks nothing"
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name} ({path})")


def test_dense_and_sparse_paths_agree_at_low_density():
    """At a realistic sparsity (few % of latents firing) both kernels give the same step."""
    sae = random_sae(d_in=32, d_sae=512, bandwidth=0.02)
    with torch.no_grad():
        sae.threshold.uniform_(0.9, 1.2)  # ~3% of (token, latent) pairs above θ
    x = torch.randn(256, 32) * 0.5
    results = {}
    for path in ("dense", "sparse"):
        sae.step_path = path
        out = sae.loss(x, 0.1)
        results[path] = (out.l0, out.fired_F, grads_of(sae, out.total))
    assert 1 < results["dense"][0] < 0.05 * 512
    assert torch.equal(results["dense"][1], results["sparse"][1])
    for name, g in results["dense"][2].items():
        torch.testing.assert_close(results["sparse"][2][name], g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threshold, expect_sparse", [(3.0, True), (0.001, False)])
def test_auto_path_on_a_large_step_picks_the_kernel_by_density(monkeypatch, threshold, expect_sparse):
    """≥ 2²⁰ (token, latent) pairs: "auto" goes sparse when few latents fire (a trained SAE) and
    dense when many do (at initialisation); either way the gradients are the reference's."""
    calls = []
    original = step_module._sparse_forward
    monkeypatch.setattr(step_module, "_sparse_forward", lambda *a: calls.append(1) or original(*a))
    sae = random_sae(d_in=8, d_sae=1024, bandwidth=0.05)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    x = torch.randn(1024, 8)
    out = sae.loss(x, 0.2)
    ours = grads_of(sae, out.total)
    assert calls == ([1] if expect_sparse else [])
    assert ours["threshold"].abs().sum() > 0
    ref = grads_of(sae, reference_loss(sae, x, 0.2))
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5)
    # bf16: "auto" selects the same latents and θ-window as the explicit dense path
    seen = {}
    for path in ("auto", "dense"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, l0, fired_F = jumprelu_step(x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold,
                                           bandwidth=sae.cfg.bandwidth, path=path)
        seen[path] = fired_F, torch.autograd.grad(l0, sae.threshold)[0]
    assert torch.equal(seen["auto"][0], seen["dense"][0])
    torch.testing.assert_close(seen["auto"][1], seen["dense"][1])


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_bf16_autocast_is_close_to_fp32(path):
    """bf16 matrix products, fp32 master weights: gradients near the fp32 ones, all fp32."""
    sae = random_sae(d_in=64, d_sae=256, bandwidth=0.05, step_path=path)
    x = torch.randn(512, 64) * 0.2
    full = grads_of(sae, sae.loss(x, 0.1).total)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.loss(x, 0.1)
    low = grads_of(sae, out.total)
    assert out.x_hat_BD.dtype == torch.float32
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert low[name].dtype == torch.float32
        rel = (low[name] - full[name]).norm() / full[name].norm()
        assert rel < 0.03, f"{name}: relative error {rel:.3g} in bf16"
    # θ's gradient depends on which π land in its window; bf16 rounding moves a few of them
    rel = (low["threshold"] - full["threshold"]).norm() / full["threshold"].norm()
    assert rel < 0.25


def test_bf16_dense_and_sparse_paths_select_the_same_latents():
    """In bf16 the sparse path pre-selects on 16-bit scores; its exact fp32 tests must give the
    dense path's active set and θ-window (same firing counts, same L0-term gradient)."""
    sae = random_sae(d_in=64, d_sae=512, bandwidth=0.05)
    with torch.no_grad():
        sae.threshold.uniform_(0.4, 0.6)
    x = torch.randn(512, 64) * 0.05
    results = {}
    for path in ("dense", "sparse"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, l0, fired_F = jumprelu_step(x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold,
                                           bandwidth=sae.cfg.bandwidth, path=path)
        assert 0 < l0 < 0.05 * 512
        (g_theta,) = torch.autograd.grad(l0, sae.threshold)
        results[path] = fired_F, g_theta
    assert torch.equal(results["dense"][0], results["sparse"][0])
    assert results["dense"][1].abs().sum() > 0
    torch.testing.assert_close(results["dense"][1], results["sparse"][1])


def _smoothed_objective(sae, x, lam, threshold, use_mse=True, use_l0=True):
    """The loss with H replaced by the rectangle kernel's CDF, S(u) = clamp(u/ε + ½, 0, 1)."""
    eps = sae.cfg.bandwidth
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    soft = ((pre - threshold) / eps + 0.5).clamp(0, 1)
    total = torch.zeros((), dtype=x.dtype)
    if use_mse:
        x_hat = (pre * soft) @ sae.W_dec + sae.b_dec
        total = total + (x_hat - x).pow(2).sum(-1).mean()
    if use_l0:
        total = total + lam * soft.sum(-1).mean()
    return total


def _finite_difference_dtheta(sae, x, lam, **which):
    """Central differences of the smoothed objective w.r.t. every θᵢ (float64)."""
    theta = sae.threshold.detach().double()
    h = 1e-6
    out = torch.empty_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        out[i] = (_smoothed_objective(sae, x, lam, theta + e, **which) - _smoothed_objective(sae, x, lam, theta - e, **which)) / (2 * h)
    return out


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_threshold_gradient_matches_finite_differences_of_smoothed_objective(path):
    sae = random_sae(d_in=8, d_sae=24, bandwidth=0.05, step_path=path).double()
    with torch.no_grad():
        sae.threshold.uniform_(1.0, 1.5)  # θ ≫ ε, so π ≈ θ inside the window (see below)
    x = torch.randn(20_000, 8, dtype=torch.float64) * 1.5
    lam = 0.7
    # ∂(λ·L0)/∂θ: the pseudo-derivative IS the derivative of the smoothed L0, so they agree exactly
    theta = sae.threshold.float().detach().requires_grad_(True)
    _, l0, _ = jumprelu_step(x.float(), sae.W_enc.float(), sae.W_dec.float(), sae.b_enc.float(),
                             sae.b_dec.float(), theta, bandwidth=sae.cfg.bandwidth, path=path)
    (grad_l0,) = torch.autograd.grad(lam * l0, theta)
    fd_l0 = _finite_difference_dtheta(sae, x, lam, use_mse=False)
    assert fd_l0.abs().sum() > 0
    torch.testing.assert_close(grad_l0.double(), fd_l0, rtol=1e-3, atol=1e-4)
    # ∂MSE/∂θ: the pseudo-derivative −(θ/ε)K·∂L/∂f differs from the smoothed objective's
    # −(π/ε)K·∂L/∂f by π/θ ∈ 1 ± ε/(2θ) inside the window, and each window entry's own share of
    # x̂ is π·H (0 or π) rather than π·S (between): equal on average, so the gap is noise that
    # shrinks with the number of entries in each window (~hundreds here); measured 2–4 %
    x_hat, l0, _ = jumprelu_step(x.float(), sae.W_enc.float(), sae.W_dec.float(), sae.b_enc.float(),
                                 sae.b_dec.float(), theta, bandwidth=sae.cfg.bandwidth, path=path)
    (grad_mse,) = torch.autograd.grad((x_hat - x.float()).pow(2).sum(-1).mean(), theta)
    fd_mse = _finite_difference_dtheta(sae, x, lam, use_l0=False)
    assert fd_mse.abs().max() > 1e-3
    rel = (grad_mse.double() - fd_mse).norm() / fd_mse.norm()
    assert rel < 0.08, f"θ-gradient of the MSE is {rel:.3f} away from the smoothed objective's"


def test_gradient_reaches_pre_activations_only_through_active_latents():
    """The L0 term sends nothing to W_enc; inactive latents get no encoder gradient."""
    sae = random_sae()
    with torch.no_grad():
        sae.threshold[:10] = 100.0  # these latents never fire
    x = torch.randn(64, 16)
    _, l0, _ = jumprelu_step(x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold,
                             bandwidth=sae.cfg.bandwidth)
    g_enc, g_theta = torch.autograd.grad(l0, [sae.W_enc, sae.threshold])
    assert g_enc.abs().max() == 0 and g_theta.abs().max() > 0
    out = sae.loss(x, 0.0)
    grads = grads_of(sae, out.total)
    never_active = out.fired_F == 0
    assert never_active[:10].all() and not never_active.all()
    assert grads["b_enc"][never_active].abs().max() == 0


# --- decoder-norm rule, fold ------------------------------------------------------------------


def test_decoder_rows_stay_unit_norm_after_steps():
    sae = random_sae(d_in=16, d_sae=64)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2, betas=(0.0, 0.999))
    x = torch.randn(128, 16)
    for _ in range(5):
        opt.zero_grad()
        sae.loss(x, 0.1).total.backward()
        sae.remove_parallel_decoder_grad_()
        parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
        assert parallel.abs().max() < 1e-5, "gradient still has a component along its decoder row"
        opt.step()
        sae.normalize_decoder_()
        sae.clamp_threshold_()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    assert (sae.threshold > 0).all()


def test_fold_gives_raw_unit_sae():
    """Release form on raw x == C × training form on x/C, for latents and reconstruction."""
    sae = random_sae()
    C = 7.3
    x_raw = torch.randn(50, 16) * C
    released = copy.deepcopy(sae)
    released.fold_input_scale(C)
    assert released.cfg.centre_input is False and sae.cfg.centre_input is True
    with torch.no_grad():
        f_train = sae.encode(x_raw / C)
        f_raw = released.encode(x_raw)
        assert (f_train > 0).sum() > 0
        torch.testing.assert_close(f_raw, C * f_train, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(released(x_raw), C * sae(x_raw / C), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(released.threshold, C * sae.threshold)
        # Gemma Scope's inference formula on the released arrays, written out
        p = x_raw @ released.W_enc + released.b_enc
        torch.testing.assert_close(f_raw, p.relu() * (p > released.threshold))


# --- recovery of a known dictionary -----------------------------------------------------------


def test_recovers_known_sparse_dictionary():
    """128 unit directions in 64 dims, ~4 active per sample with positive magnitudes, E‖x‖² = 1:
    the paper's recipe (Adam β = (0, 0.999), λ warm-up, decoder rule) finds most directions.

    (At d_in 32 — cosines between true directions ~0.18 — JumpReLU needs far more steps than a
    unit test allows; TopK finds them in a few hundred.  64 dims keep the test to seconds.)"""
    g = torch.Generator().manual_seed(0)
    d_in, n_true, per_sample = 64, 128, 4
    dirs = torch.randn(n_true, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def sample(n):
        on = torch.rand(n, n_true, generator=g) < per_sample / n_true
        return (on * (torch.rand(n, n_true, generator=g) + 0.5)) @ dirs

    scale = sample(20_000).pow(2).sum(1).mean().sqrt()
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=256, bandwidth=0.05, threshold_init=0.1))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.0, 0.999))
    steps, lam = 1000, 0.05
    for step in range(steps):
        out = sae.loss(sample(256) / scale, lam * min(1.0, step / 300))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        sae.clamp_threshold_()
    with torch.no_grad():
        x = sample(4000) / scale
        l0 = (sae.encode(x) > 0).sum(-1).float().mean()
        best_cos = (dirs @ sae.W_dec.T).max(dim=1).values
    recovered = (best_cos > 0.9).float().mean()
    assert recovered >= 0.8, f"only {recovered:.2f} of the true directions recovered"
    assert 2.5 <= l0 <= 6, f"L0 {l0:.2f} is far from the true 4"
