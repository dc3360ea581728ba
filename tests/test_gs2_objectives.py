"""Gemma Scope 2's training options: the quadratic target-L0 penalty, the high-frequency latent
penalty and Matryoshka SAEs — values and gradients by hand, against plain autograd, and on both
kernels of the fused step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from saescope.sae.base import SAEConfig
from saescope.sae.jumprelu import JumpReLUSAE, frequency_penalty, quadratic_l0_penalty
from saescope.sae.jumprelu_step import jumprelu_step
from saescope.sae.prefixes import check_prefixes
from saescope.sae.registry import build_sae
from test_sae_jumprelu import _RefJumpReLU, _RefStep, grads_of, random_sae


pytestmark = pytest.mark.usefixtures("one_thread")


def identity_step(x_BF, theta_F, eps, path, straight_through=False):
    """The fused step with W_enc = W_dec = I and b_enc = 0, so π = x (values chosen by hand);
    returns θ and b_enc (both requiring grad) and the step's outputs."""
    F = x_BF.shape[1]
    eye = torch.eye(F)
    theta = theta_F.clone().requires_grad_(True)
    b_enc = torch.zeros(F, requires_grad=True)
    out = jumprelu_step(x_BF, eye, eye, b_enc, torch.zeros(F), theta, bandwidth=eps, centre_input=False,
                        path=path, counts=True, counts_straight_through=straight_through)
    return (theta, b_enc), out


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
    (theta, b_enc), (x_hat, l0_B, fired_F) = identity_step(X_BY_HAND, torch.full((4,), 0.5), 0.1, path)
    assert l0_B.tolist() == [3.0, 1.0, 3.0]
    assert fired_F.tolist() == [2.0, 2.0, 1.0, 2.0]
    loss = quadratic_l0_penalty(l0_B, 2.0, 0.5)
    assert loss.item() == pytest.approx(0.5)
    g, g_b_enc = torch.autograd.grad(loss, [theta, b_enc], allow_unused=True)
    torch.testing.assert_close(g, torch.tensor([-10 / 3, 0.0, 0.0, 10 / 3]))
    assert g_b_enc is None or g_b_enc.abs().max() == 0  # no straight-through gradient from the L0


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
    """τ = 0.5, running frequencies p̂ = (0.9, 0.4, 0.6, 0.5): latents 0 and 2 are above τ
    (weights w = 1[p̂ > τ] = (1, 0, 1, 0)).  Batch frequencies c/B = (2, 2, 1, 2)/3, so with
    coefficient 3 the penalty is 3·(2/3 + 1/3) = 3.  ∂/∂θ_i = −3·w_i·(tokens in θ_i's window)/(ε·B):
    latent 0 has 3 window tokens → −3·3/(0.1·3) = −30; latent 2 has none → 0.  Straight through,
    π gets the opposite: ∂/∂b_enc,0 = +30 (so b_enc falls as θ rises)."""
    (theta, b_enc), (_, _, fired_F) = identity_step(X_BY_HAND, torch.full((4,), 0.5), 0.1, path, straight_through=True)
    estimate = torch.tensor([0.9, 0.4, 0.6, 0.5])
    loss = frequency_penalty(fired_F, 3, estimate, 0.5, 3.0)
    assert loss.item() == pytest.approx(3.0)
    g, g_b_enc = torch.autograd.grad(loss, [theta, b_enc])
    torch.testing.assert_close(g, torch.tensor([-30.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(g_b_enc, torch.tensor([30.0, 0.0, 0.0, 0.0]))


class _RefCountsStraightThrough(torch.autograd.Function):
    """H(π − θ) with the kernel's straight-through estimate to π: ∂/∂π = +(1/ε)K, ∂/∂θ = −(1/ε)K."""

    @staticmethod
    def forward(ctx, pre, threshold, eps):
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        kernel = ((pre - threshold).abs() < ctx.eps / 2).to(pre) / ctx.eps
        return kernel * grad, -(kernel * grad).sum(0), None


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_frequency_penalty_matches_plain_autograd_on_both_kernels(path):
    """MSE + λ·L0 + β·λ·Σ_{p̂_i > τ} c_i/B: every parameter's gradient as plain autograd gives it."""
    sae = random_sae(d_sae=96, step_path=path)
    sae.cfg.max_frequency = 0.3
    sae.register_buffer("frequency_F", torch.rand(96) * 0.6)
    sae.register_buffer("frequency_batches", torch.zeros((), dtype=torch.int64))
    sae.eval()  # keep p̂ as set
    x = torch.randn(300, 16)
    out = sae.loss(x, 0.3)
    ours = grads_of(sae, out.total)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = _RefJumpReLU.apply(pre, sae.threshold, sae.cfg.bandwidth)
    mse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    l0 = _RefStep.apply(pre, sae.threshold, sae.cfg.bandwidth).sum(-1).mean()
    counts = _RefCountsStraightThrough.apply(pre, sae.threshold, sae.cfg.bandwidth).sum(0)
    weight = (sae.frequency_F > 0.3).float()
    ref_total = mse + 0.3 * l0 + sae.cfg.frequency_coefficient * 0.3 * (weight * counts).sum() / 300
    ref = grads_of(sae, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name} ({path})")


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
    expected = 5.0 * 0.1 * float(((p > 0.2) * p).sum())
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


# --- the L0 check: a warning on a case built to fail, none on a healthy one ----------------------


def test_l0_warning_fires_when_l0_stops_responding_and_not_when_healthy():
    from saescope.train.l0_check import l0_warnings

    group = ("layer_5/resid_post", 16384, "jumprelu")
    # SAELens #719's numbers: λ ×100 moved L0 from 26.6 to 26.0
    stuck = l0_warnings([{"name": "a", "group": group, "l0": 26.6, "sparsity_coefficient": 1.0},
                         {"name": "b", "group": group, "l0": 26.0, "sparsity_coefficient": 100.0}])
    assert set(stuck) == {"a", "b"} and "stopped responding to λ" in stuck["a"][0] and "26.6 → 26.0" in stuck["a"][0]
    healthy = l0_warnings([{"name": "a", "group": group, "l0": 90.0, "sparsity_coefficient": 1.0},
                           {"name": "b", "group": group, "l0": 26.0, "sparsity_coefficient": 100.0}])
    assert healthy == {}
    # a target missed, with an L0 that did not move toward it at full λ: "not responding"
    missed = l0_warnings([{"name": "t", "group": group, "l0": 52.0, "target_l0": 20.0, "sparsity_coefficient": 1e-3,
                           "l0_after_warmup": 55.0, "warmup_end": 51}])
    assert "misses its target 20 by +160%" in missed["t"][0] and "not responding to λ" in missed["t"][0]
    # missed but still closing in: say so without blaming λ
    closing = l0_warnings([{"name": "t", "group": group, "l0": 24.0, "target_l0": 20.0, "sparsity_coefficient": 1e-3,
                            "l0_after_warmup": 60.0}])
    assert "misses" in closing["t"][0] and "not responding" not in closing["t"][0]
    on_target = l0_warnings([{"name": f"t{t}", "group": group, "l0": t * 1.1, "target_l0": t,
                              "sparsity_coefficient": 1e-3, "l0_after_warmup": t * 1.3} for t in (20, 60, 150)])
    assert on_target == {}
    flat = l0_warnings([{"name": f"t{t}", "group": group, "l0": 40.0 + t / 100, "target_l0": t,
                         "sparsity_coefficient": 1e-3} for t in (20, 60)])
    assert "does not follow the target" in flat["t20"][-1]


def _tiny_store(tmp_path):
    from conftest import build_tiny_corpus, build_tiny_model

    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.sites import Site

    harvest(build_tiny_model("gemma3", n_layers=2), None, build_tiny_corpus(n_seqs=16, seq_len=16),
            [Site(1, "resid_post")], tmp_path / "store",
            HarvestConfig(model_name="tiny-gemma3", progress=False, shard_tokens=64))
    return tmp_path / "store"


def test_cli_target_l0_makes_one_sae_per_target_named_by_it(tmp_path, capsys):
    """`saescope train --target-l0 4,8`: one SAE per target, its name says the target, its
    config.json and metrics.json hold target and achieved L0; θ from the first batch's quantiles
    puts each near its target (no warning), while the paper's θ₀ with a negligible λ cannot move
    the L0 to its target in 8 steps and says so."""
    from saescope.cli import main

    store = _tiny_store(tmp_path)
    base = ["train", "--store", str(store), "--widths", "64", "--batch-size", "32", "--no-progress",
            "--device", "cpu", "--target-l0", "4,8", "--l0-coefficients", "1e-9"]
    assert main(base + ["--out", str(tmp_path / "good"), "--threshold-init", "quantile"]) == 0
    err = capsys.readouterr().err
    assert "misses its target" not in err
    summary = json.loads((tmp_path / "good" / "train_summary.json").read_text())
    assert sorted(e["sae"] for e in summary["saes"]) == ["layer_1.resid_post.jumprelu.64.l0target4.seed0",
                                                         "layer_1.resid_post.jumprelu.64.l0target8.seed0"]
    for entry in summary["saes"]:
        folder = Path(entry["folder"])
        config = json.loads((folder / "config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())["training"]
        assert config["target_l0"] == entry["spec"]["target_l0"] == metrics["target_l0"]
        assert abs(metrics["average_l0"] - metrics["target_l0"]) <= 0.15 * metrics["target_l0"]
        assert "l0_warnings" not in metrics
    log = [json.loads(line) for line in (tmp_path / "good" / "train_log.jsonl").read_text().splitlines()]
    assert {r["target_l0"] for r in log if "l0" in r} == {4.0, 8.0}

    assert main(base + ["--out", str(tmp_path / "bad")]) == 0  # θ₀ = 0.001: half the latents fire
    err = capsys.readouterr().err
    assert err.count("misses its target") == 2
    summary = json.loads((tmp_path / "bad" / "train_summary.json").read_text())
    assert all("misses its target" in e["metrics"]["l0_warnings"][0] for e in summary["saes"])


def test_matryoshka_release_reports_every_prefix_in_eval(tmp_path):
    """A Matryoshka JumpReLU trains, is released as a JumpReLU with its prefixes in config.json,
    and eval writes each prefix's metrics (FVU, delta loss) next to the full SAE's."""
    from conftest import build_tiny_corpus, build_tiny_model

    from saescope.activations.store import ActivationStore, StoreReader
    from saescope.evaluate.suite import EvalConfig, evaluate_release
    from saescope.release import load_sae
    from saescope.train.recipe import Recipe
    from saescope.train.run import train_and_release
    from saescope.train.spec import SAESpec
    from saescope.train.trainer import Trainer, TrainOptions

    store = _tiny_store(tmp_path)
    spec = SAESpec("layer_1/resid_post", "matryoshka_jumprelu", 64, sparsity_coefficient=1e-3, target_l0=8,
                   prefixes=(8, 32))
    recipe = Recipe.for_steps(8, batch_size=32, threshold_init_mode="quantile", max_frequency=0.3)
    (folder,) = train_and_release(Trainer(StoreReader(ActivationStore(store), [spec.site]), [spec], recipe,
                                          tmp_path / "run", n_steps=8, options=TrainOptions(progress=False)))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "jumprelu" and config["matryoshka_prefixes"] == [8, 32]
    assert config["trained_as"]["architecture"] == "matryoshka_jumprelu"
    assert load_sae(folder).cfg.d_sae == 64
    model = build_tiny_model("gemma3", n_layers=2)
    summary = evaluate_release(tmp_path / "run" / "release", model, build_tiny_corpus(n_seqs=8, seq_len=16),
                               EvalConfig(progress=False))
    (entry,) = summary["saes"].values()
    assert set(entry["prefixes"]) == {"8", "32"} and entry["target_l0"] == 8
    eval_section = json.loads((folder / "metrics.json").read_text())["eval"]
    small, mid = eval_section["prefixes"]["8"], eval_section["prefixes"]["32"]
    assert small["d_sae"] == 8 and small["l0"] <= mid["l0"] <= eval_section["l0"]
    assert all(math.isfinite(p["fvu"]) and math.isfinite(p["delta_loss"]) for p in (small, mid))


def test_target_l0_frequency_and_matryoshka_resume_bit_identically(tmp_path):
    """The running frequency p̂ and the post-warm-up L0 sums are checkpointed with the weights."""
    from trainer_kit import RECIPE, RESID, make_data, straight_and_resumed

    from saescope.activations.source import InMemorySource
    from saescope.train.spec import SAESpec

    specs = [SAESpec(RESID, "jumprelu", 64, sparsity_coefficient=1e-2, target_l0=6),
             SAESpec(RESID, "matryoshka_jumprelu", 64, sparsity_coefficient=1e-2, target_l0=6, prefixes=(8, 32))]
    recipe = RECIPE.replace(threshold_init_mode="quantile", max_frequency=0.2, frequency_window_tokens=64)
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path, specs=specs, build_sae=None,
                                              recipe=recipe)
    for a, b in zip(reference.trainers, resumed.trainers):
        state = a.sae.state_dict()
        assert "frequency_F" in state and int(state["frequency_batches"]) == 12
        for key, value in state.items():
            assert torch.equal(value, b.sae.state_dict()[key]), f"{a.name}: {key} differs after resume"
        assert torch.equal(a.response_sums, b.response_sums)


def test_a_jumprelu_transcoder_trains_against_its_target_l0():
    """Transcoders call the same objective: the quadratic around the target L0, on ŷ vs y."""
    torch.manual_seed(0)
    tc = build_sae(SAEConfig(d_in=12, d_sae=48, architecture="jumprelu_transcoder", d_out=10, bandwidth=0.05,
                             target_l0=5.0))
    with torch.no_grad():
        tc.threshold.uniform_(0.0, 0.3)
    x, y = torch.randn(200, 12), torch.randn(200, 10)
    out = tc.loss(x, 0.3, target_BD=y)
    l0_B = (tc.encode(x) != 0).sum(-1).float()
    assert out.sparsity.item() == pytest.approx(0.3 * (2 / 5) * float((l0_B - 5).pow(2).mean()), rel=1e-5)
    torch.testing.assert_close(out.mse, (tc(x) - y).pow(2).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    g = grads_of(tc, out.total)["threshold"]
    assert g.abs().sum() > 0
