"""Each metric on a case computed by hand, and the streaming accumulators against one-shot numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saescope.evaluate import metrics as M


def test_fvu_is_about_the_mean_not_about_zero():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    x_hat = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # always predicts the mean
    # Σ‖x − x̂‖² = 2 + 2 = 4; Σ‖x − x̄‖² = 4 -> 1.0.  About zero it would be 4 / (2 + 18) = 0.2.
    assert M.fvu(x, x_hat) == pytest.approx(1.0)
    stats = M.ReconstructionStats(2, 3)
    stats.update(x, x_hat, torch.zeros(2, 3))
    assert stats.summary()["fvu"] == pytest.approx(1.0)
    x_hat_better = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert M.fvu(x, x_hat_better) == pytest.approx(2 / 4)


def test_mse_sums_over_width_and_averages_over_tokens():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    stats = M.ReconstructionStats(2, 1)
    stats.update(x, torch.zeros(2, 2), torch.zeros(2, 1))
    assert stats.summary()["mse"] == pytest.approx(2.5)  # (1 + 4 + 0) / 2 tokens, not / 4 elements


def test_cossim_l2_ratio_l0_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, -2.0]])
    f = torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    stats = M.ReconstructionStats(2, 4)
    stats.update(x, x_hat, f)
    out = stats.summary()
    assert out["cossim"] == pytest.approx((1 / math.sqrt(2) - 1.0) / 2)
    assert out["l2_ratio"] == pytest.approx((math.sqrt(2) + 2.0) / 2)
    assert out["l0"] == pytest.approx(1.0)  # 2 active latents, then 0
    assert out["n_tokens"] == 2
    # a zero reconstruction has cosine 0 (not NaN)
    assert M.cossim_per_token(x, torch.zeros_like(x)).tolist() == [0.0, 0.0]


def test_dead_and_high_frequency_latents():
    n_tokens = 20
    f = torch.zeros(n_tokens, 4)
    f[:1, 1] = 1.0  # 5% of tokens
    f[:2, 2] = 1.0  # exactly 10%: not "more than 10%"
    f[:3, 3] = 1.0  # 15%
    stats = M.ReconstructionStats(1, 4)
    stats.update(torch.randn(n_tokens, 1), torch.randn(n_tokens, 1), f)
    out = stats.summary()
    assert out["frac_dead"] == pytest.approx(0.25)
    assert out["frac_high_freq"] == pytest.approx(0.25)
    assert stats.firing_counts().tolist() == [0, 1, 2, 3]


def test_firing_histogram_log10_density():
    hist = M.firing_histogram(np.array([0, 1, 10, 100, 1000]), n_tokens=1000)
    assert hist["n_dead"] == 1
    assert sum(hist["counts"]) == 4
    edges = np.array(hist["log10_density_edges"])
    filled = edges[:-1][np.array(hist["counts"]) > 0]
    # densities 1e-3, 1e-2, 1e-1 and 1 (clipped into the last bin, whose right edge is 0)
    assert filled.tolist() == pytest.approx([-3.0, -2.0, -1.0, -0.2])


def test_cross_entropy_kl_and_ce_loss_score_by_hand():
    log_probs = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert M.cross_entropy_per_token(log_probs, torch.tensor([0, 1])).tolist() == pytest.approx(
        [math.log(2), -math.log(0.1)]
    )
    kl = M.kl_div_per_token(log_probs[:1], log_probs[1:])
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert M.ce_loss_score(ce_clean=2.0, ce_spliced=2.5, ce_zero_ablation=4.0) == pytest.approx(0.75)
    assert math.isnan(M.ce_loss_score(2.0, 2.5, 2.0))


def test_loss_stats_means_and_derived_metrics():
    spliced, zero = M.LossStats(2), M.LossStats(2)
    group = torch.tensor([0, 0, 1])
    ce_clean = torch.tensor([1.0, 2.0, 3.0])
    spliced.update(ce_clean, torch.tensor([1.5, 2.5, 3.0]), torch.tensor([0.1, 0.2, 0.0]), group)
    zero.update(ce_clean, torch.tensor([5.0, 6.0, 9.0]), torch.tensor([1.0, 1.0, 1.0]), group)
    total = M.loss_metrics(spliced.means(merged=True)[0], zero.means(merged=True)[0])
    assert total["ce_clean"] == pytest.approx(2.0)
    assert total["delta_loss"] == pytest.approx(1.0 / 3)
    assert total["kl_div"] == pytest.approx(0.1)
    assert total["ce_loss_score"] == pytest.approx((20 / 3 - 7 / 3) / (20 / 3 - 2.0))
    g0 = M.loss_metrics(spliced.means(merged=False)[0], zero.means(merged=False)[0])
    assert g0["delta_loss"] == pytest.approx(0.5) and g0["n_loss_tokens"] == 2


def test_saebench_figures_by_hand():
    """SAEBench's core names: explained variance, shrinkage, L1, firing frequencies, KL score."""
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[0.5, 0.0], [0.0, 1.0]])  # half of x: shrunk by 2
    f = torch.tensor([[0.0, 1.5, -2.0], [0.0, 3.0, 0.0]])
    stats = M.ReconstructionStats(2, 3)
    stats.update(x, x_hat, f)
    out = stats.summary()
    assert out["explained_variance"] == pytest.approx(1 - out["fvu"])
    # Σ‖x̂‖² / Σ x·x̂ = (0.25 + 1) / (0.5 + 2) = 0.5
    assert out["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert out["l1"] == pytest.approx((3.5 + 3.0) / 2)  # |f| summed, negative latents too
    assert out["l2_norm_in"] == pytest.approx(1.5) and out["l2_norm_out"] == pytest.approx(0.75)
    assert out["frac_alive"] == pytest.approx(2 / 3) and out["frac_dead"] == pytest.approx(1 / 3)
    assert out["freq_over_10_percent"] == pytest.approx(2 / 3)
    # latent 1 fires on 2 tokens, latent 2 on 1: all firings come from latents above 10%
    assert out["normalized_freq_over_10_percent"] == pytest.approx(1.0)
    assert M.kl_div_score(kl_sae=0.25, kl_zero_ablation=1.0) == pytest.approx(0.75)
    assert math.isnan(M.kl_div_score(0.1, 0.0))


def test_saebench_block_names_and_nesting():
    spliced, zero = M.LossStats(1), M.LossStats(1)
    spliced.update(torch.tensor([2.0]), torch.tensor([2.5]), torch.tensor([0.1]))
    zero.update(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([2.0]))
    metrics = M.loss_metrics(spliced.means(merged=True)[0], zero.means(merged=True)[0])
    block = M.saebench_core({**metrics, "l0": 7.0})
    perf, behaviour = block["model_performance_preservation"], block["model_behavior_preservation"]
    assert perf == pytest.approx({"ce_loss_score": 0.75, "ce_loss_with_ablation": 4.0, "ce_loss_with_sae": 2.5,
                                  "ce_loss_without_sae": 2.0})
    assert behaviour == pytest.approx({"kl_div_score": 0.95, "kl_div_with_ablation": 2.0, "kl_div_with_sae": 0.1})
    assert block["sparsity"]["l0"] == 7.0 and math.isnan(block["sparsity"]["l1"])  # missing: NaN, not absent


def _numpy_reference(x, x_hat, f):
    x, x_hat, f = (np.asarray(a, dtype=np.float64) for a in (x, x_hat, f))
    err = ((x - x_hat) ** 2).sum(-1)
    return {
        "fvu": err.sum() / ((x - x.mean(0)) ** 2).sum(),
        "mse": err.mean(),
        "l0": (f != 0).sum(-1).mean(),
    }


def test_streaming_over_batches_and_groups_matches_one_shot():
    torch.manual_seed(0)
    n, d, F = 300, 8, 16
    # a large mean next to a small variance: Σ‖x‖² − N‖x̄‖² would cancel catastrophically
    x = 1e6 + 1e-2 * torch.randn(n, d, dtype=torch.float64)
    x_hat = x + 1e-3 * torch.randn(n, d, dtype=torch.float64)
    f = torch.relu(torch.randn(n, F))
    group = torch.randint(0, 3, (n,))
    stats = M.ReconstructionStats(d, F, n_groups=3)
    for rows in torch.arange(n).split(37):
        stats.update(x[rows], x_hat[rows], f[rows], group[rows])

    total = stats.summary()
    ref = _numpy_reference(x, x_hat, f)
    for key in ("fvu", "mse", "l0"):
        assert total[key] == pytest.approx(ref[key], rel=1e-6), key
    assert total["fvu"] == pytest.approx(1e-2, rel=0.3)  # (1e-3)² / (1e-2)²: about the mean, not ~1e-16

    for g, out in enumerate(stats.by_group()):
        mask = (group == g).numpy()
        ref = _numpy_reference(x[mask], x_hat[mask], f[mask])
        assert out["n_tokens"] == mask.sum()
        for key in ("fvu", "mse", "l0"):
            assert out[key] == pytest.approx(ref[key], rel=1e-6), (g, key)
