"""Gemma Scope 2's training options: the quadratic target-L0 penalty, the high-frequency latent
penalty and Matryoshka SAEs — values and gradients by hand, against plain autograd, and on both
kernels of the fused step."""

from __future__ import annotations

import pytest
import torch

from saescope.sae.base import SAEConfig
from saescope.sae.jumprelu import JumpReLUSAE, frequency_penalty, quadratic_l0_penalty
from saescope.sae.jumprelu_step import jumprelu_step
from saescope.sae.prefixes import check_prefixes
from saescope.sae.registry import build_sae
from test_sae_jumprelu import _RefJumpReLU, _RefStep, grads_of, random_sae


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def identity_step(x_BF, theta_F, eps, path, grad_theta=True):
    """The fused step with W_enc = W_dec = I and no biases, so π = x (values chosen by hand)."""
    F = x_BF.shape[1]
    eye = torch.eye(F)
    theta = theta_F.clone().requires_grad_(grad_theta)
    out = jumprelu_step(x_BF, eye, eye, torch.zeros(F), torch.zeros(F), theta, bandwidth=eps, centre_input=False,
                        path=path, counts=True)
    return theta, out


# θ = 0.5 everywhere, ε = 0.1: the window is |π − θ| < 0.05.  Per token: which latents fire, and
# which pairs lie in θ's window.
X_BY_HAND = torch.tensor([
    [0.52, 0.90, 0.10, 0.70],  # fires 0, 1, 3 → L0 3; window: latent 0
    [0.48, 0.20, 0.20, 0.53],  # fires 3       → L0 1; window: latents 0, 3
    [0.51, 0.80, 0.70, 0.10],  # fires 0, 1, 2 → L0 3; window: latent 0
])


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_quadratic_l0_value_and_threshold_gradient_by_hand(path):
    """λ(2/L*)·mean_b (l_b − L*)² with L* = 2, λ = 0.5: per-token L0s (3, 1, 3) give 0.5·1·1 = 0.5.
    ∂/∂l_b = λ(4/L*)(l_b − L*)/B = (+1/3, −1/3, +1/3); per token the θ route is
    ∂l_b/∂θ_i = −(1/ε)·1[|π_bi − θ_i| < ε/2], so ∂/∂θ₀ = −10·(1/3 − 1/3 + 1/3) = −10/3 (tokens
    above the target raise θ₀), ∂/∂θ₃ = −10·(−1/3) = +10/3 (token 1 is below it: θ₃ falls)."""
    theta, (x_hat, l0_B, fired_F) = identity_step(X_BY_HAND, torch.full((4,), 0.5), 0.1, path)
    assert l0_B.tolist() == [3.0, 1.0, 3.0]
    assert fired_F.tolist() == [2.0, 2.0, 1.0, 2.0]
    loss = quadratic_l0_penalty(l0_B, 2.0, 0.5)
    assert loss.item() == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(g, torch.tensor([-10 / 3, 0.0, 0.0, 10 / 3]))


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_per_token_l0_mean_has_the_plain_l0_gradient(path):
    """counts=True's l0_B.mean() is the plain L0 term, value and gradient (every parameter)."""
    sae = random_sae(step_path=path)
    x = torch.randn(300, 16)
    args = (x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, sae.threshold)
    x_hat, l0, fired = jumprelu_step(*args, bandwidth=sae.cfg.bandwidth, path=path)
    plain = grads_of(sae, (x_hat - x).pow(2).sum(-1).mean() + 0.3 * l0)
    x_hat2, l0_B, fired2 = jumprelu_step(*args, bandwidth=sae.cfg.bandwidth, path=path, counts=True)
    per_token = grads_of(sae, (x_hat2 - x).pow(2).sum(-1).mean() + 0.3 * l0_B.mean())
    assert torch.equal(fired, fired2.long()) and l0.item() == pytest.approx(l0_B.mean().item())
    assert plain["threshold"].abs().sum() > 0
    for name, g in plain.items():
        torch.testing.assert_close(per_token[name], g, rtol=1e-5, atol=1e-6)


def reference_quadratic_loss(sae, x, lam, target):
    """Plain autograd from the equations: MSE + λ(2/L*)·mean_b (Σ_i H(π_bi − θ_i) − L*)²."""
    centred = x - sae.b_dec if sae.cfg.centre_input else x
    pre = centred @ sae.W_enc + sae.b_enc
    f = _RefJumpReLU.apply(pre, sae.threshold, sae.cfg.bandwidth)
    l0_B = _RefStep.apply(pre, sae.threshold, sae.cfg.bandwidth).sum(-1)
    return (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean() + lam * (2 / target) * (l0_B - target).pow(2).mean()


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_target_l0_loss_matches_plain_autograd(path):
    sae = random_sae(step_path=path)
    sae.cfg.target_l0 = 20.0
    x = torch.randn(300, 16)
    out = sae.loss(x, 0.3)
    ours = grads_of(sae, out.total)
    ref_total = reference_quadratic_loss(sae, x, 0.3, 20.0)
    ref = grads_of(sae, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    assert ours["threshold"].abs().sum() > 0
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name} ({path})")


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_frequency_penalty_value_and_gradient_by_hand(path):
    """τ = 0.5, running frequencies p̂ = (0.9, 0.4, 0.6, 0.5): weights w = max(0, p̂ − τ)/τ =
    (0.8, 0, 0.2, 0).  Batch frequencies c/B = (2, 2, 1, 2)/3, so with coefficient 3 the penalty is
    3·(0.8·2/3 + 0.2·1/3) = 1.8.  ∂/∂θ_i = −3·w_i·(tokens in θ_i's window)/(ε·B):
    latent 0 has 3 window tokens → −3·0.8·3/(0.1·3) = −24; latent 2 has none → 0."""
    theta, (_, _, fired_F) = identity_step(X_BY_HAND, torch.full((4,), 0.5), 0.1, path)
    estimate = torch.tensor([0.9, 0.4, 0.6, 0.5])
    loss = frequency_penalty(fired_F, 3, estimate, 0.5, 3.0)
    assert loss.item() == pytest.approx(1.8)
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(g, torch.tensor([-24.0, 0.0, 0.0, 0.0]))


def test_frequency_penalty_in_the_loss_updates_the_running_estimate_and_acts_above_tau_only():
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=16, d_sae=64, bandwidth=0.05, max_frequency=0.2, frequency_coefficient=5.0,
                                frequency_window=4))
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 0.6)
    x = torch.randn(400, 16)
    out = sae.loss(x, 0.1)
    p = out.fired_F.double() / 400
    torch.testing.assert_close(sae.frequency_F.double(), p, rtol=0, atol=1e-7)  # first batch: p̂ = p
    expected = 5.0 * 0.1 * float(((p - 0.2).clamp_min(0) / 0.2 * p).sum())
    assert out.aux.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    # the gradient reaches θ of latents above τ only (besides the MSE's part): compare with λ = 0
    g_with = grads_of(sae, out.total)["threshold"]
    sae.frequency_F.copy_(p.float())
    sae.eval()  # no update: the same p̂ as above
    sae.cfg.max_frequency = None
    g_without = grads_of(sae, sae.loss(x, 0.1).total)["threshold"]
    differs = (g_with - g_without).abs() > 1e-6
    assert differs.any() and bool((p[differs] > 0.2).all())
    # a second batch moves p̂ by 1/2 of the way (running mean over the first `window` batches)
    sae.train()
    sae.cfg.max_frequency = 0.2
    sae.frequency_F.zero_()
    sae.frequency_batches.fill_(1)
    sae.loss(x, 0.1)
    torch.testing.assert_close(sae.frequency_F.double(), p / 2, rtol=0, atol=1e-7)


# --- Matryoshka ---------------------------------------------------------------------------------


def matryoshka_reference(sae, x, lam, prefixes):
    """Σ over prefixes m (and the full width) of ‖x − x̂_m‖², x̂_m decoding latents < m, + λ·L0."""
    centred = x - sae.b_dec
    pre = centred @ sae.W_enc + sae.b_enc
    f = _RefJumpReLU.apply(pre, sae.threshold, sae.cfg.bandwidth)
    total = sum((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean() for m in (*prefixes, sae.cfg.d_sae))
    return total + lam * _RefStep.apply(pre, sae.threshold, sae.cfg.bandwidth).sum(-1).mean()


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_matryoshka_jumprelu_loss_is_the_sum_of_prefix_losses(path):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=16, d_sae=96, architecture="matryoshka_jumprelu", prefixes=(8, 32), bandwidth=0.05))
    sae.step_path = path
    with torch.no_grad():
        sae.threshold.uniform_(0.2, 0.8)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    x = torch.randn(300, 16)
    out = sae.loss(x, 0.3)
    ours = grads_of(sae, out.total)
    ref_total = matryoshka_reference(sae, x, 0.3, (8, 32))
    ref = grads_of(sae, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    # the prefix SAE alone reconstructs with exactly its latents
    small = sae.prefix(32)
    full_f = sae.encode(x)
    torch.testing.assert_close(small(x), full_f[:, :32] @ sae.W_dec[:32] + sae.b_dec)


def test_matryoshka_batchtopk_loss_is_the_sum_of_prefix_losses():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=16, d_sae=64, architecture="matryoshka_batchtopk", k=6, prefixes=(4, 16)))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
    x = torch.randn(200, 16)
    out = sae.loss(x, 0.0)
    ours = grads_of(sae, out.total)
    f = sae._batch_topk(sae.pre_activations(x))
    ref_total = sum((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum(-1).mean() for m in (4, 16, 64))
    ref = grads_of(sae, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6)
    released = sae.to_jumprelu()
    assert released.architecture == "jumprelu" and released.cfg.metadata["prefixes"] == [4, 16]


def test_prefixes_are_checked():
    assert check_prefixes((), 2048) == (128, 512)
    assert check_prefixes([64, 256, 2048], 2048) == (64, 256)
    for bad in ((256, 64), (64, 64), (0, 8), (64, 4096)):
        with pytest.raises(ValueError, match="prefixes"):
            check_prefixes(bad, 2048)
    with pytest.raises(ValueError, match="target_l0"):
        JumpReLUSAE(SAEConfig(d_in=4, d_sae=8, target_l0=-1.0))
