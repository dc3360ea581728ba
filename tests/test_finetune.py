"""The KL + MSE fine-tune: its loss and gradient against a by-hand computation, and its folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_corpus

from saescope.sae.input_norm import InputNorm
from saescope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saescope.sites import Site, hook_site, site_width
from saescope.tokens import scored_positions
from saescope.train.finetune import FinetuneConfig, KLFinetune, _NormalisedJumpReLU, finetune_kl


def release_form_sae(d_in: int, d_sae: int = 32, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUConfig(d_in, d_sae, centre_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.normalize_decoder_()
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold.fill_(0.05)
    return sae


def test_normalised_form_and_fold_back_are_exact():
    D = 12
    sae = release_form_sae(D)
    g = torch.Generator().manual_seed(1)
    norm = InputNorm(torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.2, "diagonal")
    x = torch.randn(50, D, generator=g) * 2
    work = _NormalisedJumpReLU(sae, norm)
    x_hat_n, f = work(norm.apply(x))
    with torch.no_grad():
        # the same latents, each scaled so its decoder row is unit-norm in normalised units
        n_F = (sae.W_dec * norm.gain_D).norm(dim=1)
        torch.testing.assert_close(f, sae.encode(x) * n_F, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(work.W_dec.norm(dim=1), torch.ones(32), atol=1e-6, rtol=0)
        torch.testing.assert_close(x_hat_n / norm.gain_D + norm.shift_D, sae(x), atol=1e-5, rtol=1e-5)
        folded = release_form_sae(D, seed=5)
        work.fold_into(folded)
        torch.testing.assert_close(folded(x), sae(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(32), atol=1e-6, rtol=0)


def by_hand_loss(model, corpus, site, work, norm, rows, alpha, beta):
    """(MSE + αβ·KL)/(1+β) with a full forward and autograd through everything."""
    ids = torch.from_numpy(corpus.input_ids[rows]).long()
    keep = torch.from_numpy(corpus.keep_mask[rows])
    scored = torch.from_numpy(scored_positions(corpus)[rows])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[scored]
    seen = {}

    def splice(x):
        x_n = norm.apply(x)
        x_hat_n, _ = work(x_n)
        seen["mse"] = (x_hat_n - x_n).square().sum(-1)[keep].mean()
        x_hat = x_hat_n / norm.gain_D + norm.shift_D
        return torch.cat([x[:, :1], x_hat[:, 1:]], 1)

    handle = hook_site(model, site, splice)
    try:
        log_q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[scored]
    finally:
        handle.remove()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return (seen["mse"] + alpha * beta * kl) / (1 + beta), seen["mse"], kl


@pytest.mark.parametrize("arch,site", [("gemma3", Site(1, "resid_post")), ("gemma2", Site(1, "mlp_out")),
                                       ("gpt2", Site(2, "attn_z"))])
def test_loss_and_gradient_equal_the_by_hand_computation(tiny_model, arch, site):
    """gemma2 soft-caps its logits (the chain rule through tanh); layer 1+ replays the prefix."""
    model = tiny_model(arch)
    corpus = build_tiny_corpus(n_seqs=6, seq_len=16)
    sae = release_form_sae(site_width(model, site), seed=2)
    with torch.no_grad():
        sae.threshold.fill_(0.0)  # every positive pre-activation fires: a useful gradient everywhere
    ft = KLFinetune(model, corpus, site, sae, FinetuneConfig(tokens=40, batch_seqs=3, beta=0.7, chunk_tokens=7))
    rows = ft.rows[:3]
    terms = ft.backward(rows)
    assert terms["alpha"] == pytest.approx(terms["mse"] / terms["kl"])
    loss, mse, kl = by_hand_loss(model, corpus, site, ft.work, ft.norm, rows, terms["alpha"], 0.7)
    assert terms["mse"] == pytest.approx(float(mse.detach()), rel=1e-5)
    assert terms["kl"] == pytest.approx(float(kl.detach()), rel=1e-4, abs=1e-7)
    assert terms["loss"] == pytest.approx(float(loss.detach()), rel=1e-4)
    grads = {n: p.grad.clone() for n, p in ft.work.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    ft.work.zero_grad()
    loss.backward()
    for name, p in ft.work.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=2e-4, msg=name)


def test_finetune_lowers_the_kl_and_releases_unit_norm_rows(tiny_model):
    model = tiny_model("gemma3")
    corpus = build_tiny_corpus(n_seqs=24, seq_len=16)
    site = Site(1, "resid_post")
    sae = release_form_sae(site_width(model, site), seed=3)
    with torch.no_grad():
        sae.threshold.fill_(0.0)
    log = finetune_kl(model, corpus, site, sae, FinetuneConfig(tokens=10_000, batch_seqs=2, lr=3e-3, beta=3.0))
    assert len(log) == 12  # every sequence once, two per step
    first, last = np.mean([r["kl"] for r in log[:3]]), np.mean([r["kl"] for r in log[-3:]])
    assert last < first
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5, rtol=0)
    assert not sae.cfg.centre_input


def test_bad_input(tiny_model):
    model = tiny_model("gemma3")
    corpus = build_tiny_corpus(n_seqs=4, seq_len=16)
    with pytest.raises(ValueError, match="does not match site"):
        KLFinetune(model, corpus, Site(1, "resid_post"), release_form_sae(7))
    trained_form = JumpReLUSAE(JumpReLUConfig(site_width(model, Site(1, "resid_post")), 8))
    with pytest.raises(ValueError, match="release-form"):
        KLFinetune(model, corpus, Site(1, "resid_post"), trained_form)
    with pytest.raises(ValueError, match="lr"):
        FinetuneConfig(lr=0)
