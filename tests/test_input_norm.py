"""The input map an SAE trains behind folds exactly into the released (raw-activation) weights."""

import pytest
import torch

from saescope.sae.base import SAEConfig
from saescope.sae.input_norm import InputNorm
from saescope.sae.registry import build_sae

torch.set_num_threads(1)


def _data(D=24, N=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * torch.linspace(0.1, 5, D) + torch.linspace(-3, 3, D)
    x[:, 3] *= 40  # a massive dimension, as in Gemma 3
    return x


def _norm(x, mode):
    xd = x.double()
    return InputNorm.from_sums(mode, x.shape[0], xd.sum(0), xd.square().sum(0))


@pytest.mark.parametrize("mode", ["scalar", "centred", "diagonal"])
def test_estimated_map_has_unit_mean_squared_norm(mode):
    x = _data()
    norm = _norm(x, mode)
    xn = norm.apply(x)
    assert xn.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-4)
    if mode != "scalar":
        assert xn.mean(0).abs().max().item() < 1e-5
    if mode == "diagonal":  # centred, every dimension the same variance 1/D
        assert xn.mean(0).abs().max().item() < 1e-5
        assert torch.allclose(xn.var(0, unbiased=False), torch.full((x.shape[1],), 1 / x.shape[1]), rtol=1e-3)
    elif mode == "scalar":
        assert norm.scalar == pytest.approx(float(x.double().pow(2).sum(1).mean().sqrt()), rel=1e-6)


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("relu", None), ("topk", 5), ("batchtopk", 5)])
@pytest.mark.parametrize("mode", ["scalar", "centred", "diagonal"])
def test_fold_is_exact_on_raw_activations(arch, k, mode):
    """released(x) == trained(norm(x)) mapped back to raw units, for every architecture."""
    x = _data()
    D, F = x.shape[1], 40
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=k))
    with torch.no_grad():  # a trained-looking SAE: nonzero biases and thresholds
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.01, 0.1)
    norm = _norm(x, mode)
    xn = norm.apply(x)
    with torch.no_grad():
        f_train = sae.encode(xn)
        x_hat_train = sae.decode(f_train) / norm.gain_D + norm.shift_D
        released = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=k))
        released.load_state_dict(sae.state_dict())
        released.fold_input_norm(norm)
        assert not released.cfg.centre_input
        f_raw = released.encode(x)
        x_hat_raw = released.decode(f_raw)
    assert torch.allclose(x_hat_raw, x_hat_train, rtol=1e-4, atol=1e-4 * x.abs().max().item())
    assert torch.equal(f_raw != 0, f_train != 0)  # the same latents fire
    if released.latents_rescalable or mode != "diagonal":
        # every released decoder row has unit norm in raw units
        assert torch.allclose(released.W_dec.norm(dim=1), torch.ones(F), atol=1e-5)


def test_scalar_fold_is_the_papers_fold():
    """mode 'scalar' reproduces Gemma Scope App. A bit for bit (b_enc' = C(b_enc − b_dec W_enc), ...)."""
    torch.manual_seed(0)
    a = build_sae(SAEConfig(d_in=16, d_sae=32))
    with torch.no_grad():
        a.b_dec.normal_()
        a.b_enc.normal_()
    b = build_sae(SAEConfig(d_in=16, d_sae=32))
    b.load_state_dict(a.state_dict())
    a.fold_input_scale(3.0)
    b.fold_input_norm(InputNorm.from_scale(3.0, 16))
    for name in a.array_names:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_norm_round_trips_through_its_dict():
    x = _data()
    for mode in ("scalar", "centred", "diagonal"):
        norm = _norm(x, mode)
        back = InputNorm.from_dict(norm.to_dict(), x.shape[1])
        assert back.mode == mode
        assert torch.allclose(back.gain_D, norm.gain_D) and torch.allclose(back.shift_D, norm.shift_D)


def test_constant_dimension_gets_a_finite_gain():
    x = _data()
    x[:, 5] = 2.0
    norm = _norm(x, "diagonal")
    assert norm.is_finite
    assert torch.isfinite(norm.apply(x)).all()


def test_diagonal_power_shrinks_massive_dimensions_partially():
    x = _data()
    xd = x.double()
    half = InputNorm.from_sums("diagonal", x.shape[0], xd.sum(0), xd.square().sum(0), power=0.5)
    xn = half.apply(x)
    assert xn.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-4)
    std = x.std(0, unbiased=False)
    # gain ∝ σ^-1/2: the massive dimension keeps sqrt of its size advantage
    ratio = (half.gain_D[3] / half.gain_D[0]).item()
    assert ratio == pytest.approx((std[3] / std[0]).item() ** -0.5, rel=1e-3)
