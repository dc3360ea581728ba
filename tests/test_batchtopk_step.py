"""The fused BatchTopK step gives autograd's loss, code and gradients (saescope/sae/batchtopk_step.py)."""

from __future__ import annotations

import pytest
import torch

from saescope.sae.base import SAEConfig
from saescope.sae.batchtopk_step import batch_cut, batchtopk_step
from saescope.sae.registry import build_sae


def _pair(d_in=24, d_sae=96, k=5, seed=0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="batchtopk", k=k))
    with torch.no_grad():  # biases away from zero, so the centring terms of the gradient matter
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae


def _loss_and_grads(sae, x, fused: bool):
    sae.use_fused_step = fused
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x)
    out.total.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("B,k", [(64, 5), (700, 3)])  # 700·96 > 2·2^16: the sampled-cut path
def test_fused_step_matches_autograd_in_float32(B, k):
    sae = _pair(k=k)
    x = torch.randn(B, 24) * 2
    theta0 = sae.threshold.clone()
    ref, ref_grads = _loss_and_grads(sae, x, fused=False)
    theta_ref = sae.threshold.clone()
    sae.threshold.copy_(theta0)
    sae.threshold_batches.zero_()
    out, grads = _loss_and_grads(sae, x, fused=True)
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat_BD, ref.x_hat_BD, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.fired_F, ref.fired_F) and int(out.fired_F.sum()) == k * B
    assert out.l0.item() == pytest.approx(k)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(sae.threshold, theta_ref)  # the running inference threshold too


def test_fused_step_under_bf16_autocast_is_close_to_float32():
    sae = _pair()
    x = torch.randn(256, 24)
    _, ref = _loss_and_grads(sae, x, fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _loss_and_grads(sae, x, fused=True)
    assert out.total.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    for name, g in ref.items():
        assert (grads[name] - g).norm() < 0.05 * g.norm(), name


def test_dead_latents_take_the_autograd_path_with_auxk():
    sae = _pair()
    sae.tokens_since_fired_F[:10] = sae.cfg.dead_tokens  # ten dead latents
    out = sae.loss(torch.randn(64, 24))
    assert out.aux > 0  # AuxK is only in the autograd path


def test_batch_cut_is_the_exact_order_statistic():
    for seed, (n, keep) in enumerate([(300_000, 10_000), (1000, 999), (50, 50), (2**17, 2**14)]):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        assert batch_cut(x, keep).item() == x.topk(keep).values.min().item()


def test_fewer_positive_pre_activations_than_k_keeps_only_the_positive_ones():
    sae = _pair(k=50)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[:3] = 100.0
    x_hat, fired, cut = batchtopk_step(torch.randn(8, 24), sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, 50)
    assert fired[:3].tolist() == [8, 8, 8] and int(fired[3:].sum()) == 0 and cut > 0


def test_shape_mismatch_is_one_line():
    sae = _pair()
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 24\)"):
        batchtopk_step(torch.randn(8, 23), sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, 5)


@pytest.mark.parametrize("B,k,centre", [(64, 5, True), (700, 3, True), (300, 7, False)])
def test_sparse_step_matches_the_dense_one(B, k, centre):
    """The CPU float32 default (a sparse code) and the dense products give one step."""
    sae = _pair(k=k)
    x = torch.randn(B, 24) * 2
    params = [sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec]
    results = []
    for sparse in (False, True):
        for p in params:
            p.grad = None
        x_hat, fired, cut = batchtopk_step(x, *params, k, centre_input=centre, sparse=sparse)
        (x_hat - x).square().sum(-1).mean().backward()
        results.append((x_hat.detach(), fired, cut, [p.grad.clone() for p in params]))
    (d_hat, d_fired, d_cut, d_grads), (s_hat, s_fired, s_cut, s_grads) = results
    torch.testing.assert_close(s_hat, d_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(s_fired, d_fired) and torch.equal(s_cut, d_cut)
    for name, a, b in zip(("W_enc", "W_dec", "b_enc", "b_dec"), s_grads, d_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_step_with_nothing_kept():
    sae = _pair(k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # no positive pre-activation: nothing fires
    x_hat, fired, _ = batchtopk_step(torch.randn(16, 24), sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, 4, sparse=True)
    x_hat.sum().backward()
    assert int(fired.sum()) == 0
    torch.testing.assert_close(x_hat.detach(), sae.b_dec.detach().expand(16, -1))
    assert torch.count_nonzero(sae.W_enc.grad) == 0 and torch.count_nonzero(sae.W_dec.grad) == 0
