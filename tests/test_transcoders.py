"""Transcoders and skip transcoders, the parts: the sites they read and predict on every
architecture, gradients against plain autograd, the skip path, the fold of two maps and the
release round trip (a model, training and evaluation: test_transcoders_run.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_ARCHS
from saescope.sae.base import SAEConfig
from saescope.sae.input_norm import InputNorm
from saescope.sae.registry import build_sae
from saescope.sites import Site, adapter_for, capture, data_sites, io_sites, select_sites
from test_sae_jumprelu import _RefJumpReLU, _RefStep, grads_of

TC = Site(1, "transcoder")
X_SITE, Y_SITE = Site(1, "mlp_in"), Site(1, "mlp_out")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_transcoder(arch="jumprelu_skip_transcoder", d_in=12, d_out=10, d_sae=80, seed=0, **kw):
    torch.manual_seed(seed)
    tc = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, architecture=arch, bandwidth=0.05, k=8, **kw))
    with torch.no_grad():
        if hasattr(tc, "threshold") and tc.threshold.requires_grad:
            tc.threshold.uniform_(0.05, 0.3)
        tc.b_enc.normal_(0, 0.2)
        tc.b_dec.normal_(0, 0.2)
        if tc.skip:
            tc.W_skip.normal_(0, 0.3)
    return tc


# --- sites ------------------------------------------------------------------------------------


def test_all_still_means_the_three_sae_kinds_and_transcoders_are_selectable():
    assert {s.kind for s in select_sites("all", 3)} == {"resid_post", "attn_z", "mlp_out"}
    assert select_sites("transcoder@0-1", 3) == [Site(0, "transcoder"), Site(1, "transcoder")]
    assert select_sites("layer_2/transcoder,mlp_out@2", 3) == [Site(2, "mlp_out"), Site(2, "transcoder")]
    assert io_sites(TC) == (X_SITE, Y_SITE) and io_sites(Y_SITE) == (Y_SITE, Y_SITE)
    assert data_sites([TC, Y_SITE, Site(0, "resid_post")]) == [Site(0, "resid_post"), X_SITE, Y_SITE]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mlp_in_is_the_pre_mlp_norm_output_and_mlp_out_is_its_mlp(tiny_model, arch):
    """On every architecture: mlp_in is the normalised MLP input (Gemma: pre_feedforward_layernorm's
    output), and the block maps it to mlp_out (Gemma: through its post-MLP norm) — the pair a
    transcoder learns, captured in one forward."""
    model = tiny_model(arch)
    ids = torch.randint(3, 300, (2, 12))
    acts = capture(model, [X_SITE, Y_SITE], ids)
    block = adapter_for(model).blocks(model)[1]
    norm = {"gemma3": "pre_feedforward_layernorm", "gemma2": "pre_feedforward_layernorm", "gpt2": "ln_2"}.get(
        arch, "post_attention_layernorm")
    seen = {}
    handle = getattr(block, norm).register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    torch.testing.assert_close(acts[X_SITE], seen["x"])
    with torch.no_grad():
        y = block.mlp(acts[X_SITE])
        if arch.startswith("gemma"):
            y = block.post_feedforward_layernorm(y)
    torch.testing.assert_close(y, acts[Y_SITE])
    with pytest.raises(ValueError, match="capture the sites"):
        capture(model, [TC], ids)


# --- maths ------------------------------------------------------------------------------------


def reference_loss(tc, x, y, lam):
    """Plain autograd from the equations: no b_dec before the encoder, target y, skip path."""
    pre = x @ tc.W_enc + tc.b_enc
    f = _RefJumpReLU.apply(pre, tc.threshold, tc.cfg.bandwidth)
    y_hat = f @ tc.W_dec + tc.b_dec + (x @ tc.W_skip if tc.skip else 0)
    l0 = _RefStep.apply(pre, tc.threshold, tc.cfg.bandwidth).sum(-1).mean()
    return (y_hat - y).pow(2).sum(-1).mean() + lam * l0


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_transcoder_gradients_match_plain_autograd(arch, path):
    tc = random_transcoder(arch)
    tc.step_path = path
    x, y = torch.randn(300, 12), torch.randn(300, 10)
    out = tc.loss(x, 0.3, target_BD=y)
    ours = grads_of(tc, out.total)
    ref_total = reference_loss(tc, x, y, 0.3)
    ref = grads_of(tc, ref_total)
    torch.testing.assert_close(out.total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    assert ours["threshold"].abs().sum() > 0, "no pre-activation in θ's window: the test checks nothing"
    assert set(ours) == set(ref) == set(tc.array_names) and ("W_skip" in ours) == tc.skip
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"{arch} {path}: ∂{name}")


def test_skip_path_contributes_exactly_x_times_W_skip():
    tc = random_transcoder("jumprelu_skip_transcoder")
    x = torch.randn(50, 12)
    f = tc.encode(x)
    torch.testing.assert_close(tc.predict(x) - tc.decode(f), x @ tc.W_skip, rtol=0, atol=1e-6)
    torch.testing.assert_close(tc(x), f @ tc.W_dec + tc.b_dec + x @ tc.W_skip)
    with torch.no_grad():
        tc.W_skip.zero_()
    torch.testing.assert_close(tc.predict(x), tc.decode(f), rtol=0, atol=0)


def test_init_follows_gemma_scope_appendix_b():
    tc = random_transcoder("jumprelu_transcoder", d_in=12, d_out=10, d_sae=64)
    fresh = build_sae(SAEConfig(d_in=12, d_sae=64, d_out=10, architecture="jumprelu_skip_transcoder"))
    assert not fresh.cfg.centre_input and fresh.W_dec.shape == (64, 10) and fresh.b_dec.shape == (10,)
    torch.testing.assert_close(fresh.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(fresh.W_enc.norm(dim=0), torch.ones(64))  # unit columns, not W_decᵀ
    assert fresh.W_skip.abs().max() == 0 and fresh.b_dec.abs().max() == 0
    with pytest.raises(ValueError, match="never subtracts b_dec"):
        build_sae(SAEConfig(d_in=12, d_sae=64, architecture="jumprelu_transcoder", centre_input=True))
    with pytest.raises(ValueError, match="needs its target"):
        tc.loss(torch.randn(4, 12), 0.1)


def _scalar(c, d):
    return InputNorm.from_scale(c, d)


def _diagonal(d, seed):
    g = torch.Generator().manual_seed(seed)
    return InputNorm(torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.2, "diagonal")


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder", "batchtopk_skip_transcoder"])
@pytest.mark.parametrize("maps", ["scalar", "diagonal"])
def test_fold_of_two_maps_is_exact(arch, maps):
    """Released on raw x, the transcoder predicts raw y exactly as the trained one did on the
    normalised x: ŷ_raw = ŷ_n(x_n) mapped back; decoder rows come out unit-norm."""
    tc = random_transcoder(arch)
    if maps == "scalar":
        norm_in, norm_out = _scalar(3.0, 12), _scalar(0.25, 10)  # two different scalars
    else:
        norm_in, norm_out = _diagonal(12, 1), _diagonal(10, 2)
    x_raw = torch.randn(200, 12) * 3 + 1
    x_n = norm_in.apply(x_raw)
    with torch.no_grad():
        f_n = tc.encode(x_n)
        y_n = tc.predict(x_n, f_n)
        tc.fold_io_norms(norm_in, norm_out)
        f_raw = tc.encode(x_raw)
        y_raw = tc.predict(x_raw, f_raw)
    torch.testing.assert_close(y_raw, y_n / norm_out.gain_D + norm_out.shift_D, rtol=1e-4, atol=1e-4)
    assert torch.equal(f_raw != 0, f_n != 0)  # the same latents fire
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(tc.cfg.d_sae))
    if maps == "scalar":  # latents scaled by C_out
        torch.testing.assert_close(f_raw, f_n * 0.25, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="two maps"):
        tc.fold_input_norm(norm_in)


@pytest.mark.parametrize("arch", ["jumprelu_transcoder", "jumprelu_skip_transcoder", "batchtopk_transcoder",
                                  "batchtopk_skip_transcoder"])
def test_config_round_trips_and_saes_options_are_dropped(arch):
    from saescope.sae.base import CONFIG_CLASSES

    own = CONFIG_CLASSES[arch]
    cfg = own(d_in=8, d_sae=32, d_out=6, architecture=arch, k=3) if hasattr(own, "k") else \
        own(d_in=8, d_sae=32, d_out=6, architecture=arch, bandwidth=0.01)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert type(SAEConfig.from_dict(saved)) is own and SAEConfig.from_dict(saved) == cfg
    assert build_sae(SAEConfig.from_dict(saved)).cfg == cfg
    # the trainer's flat call: other architectures' options dropped, d_out kept
    flat = SAEConfig(d_in=8, d_sae=32, d_out=6, architecture=arch, k=3, bandwidth=0.01, threshold_init=0.02,
                     dead_tokens=100)
    assert type(flat) is own and flat.d_out == 6 and not flat.centre_input
    assert not hasattr(SAEConfig(d_in=8, d_sae=32, d_out=6, architecture="jumprelu"), "d_out")


def test_release_round_trip_through_save_and_load_sae(tmp_path):
    import saescope
    from saescope.release.save import save_sae

    for arch in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        tc = random_transcoder(arch)
        folder = save_sae(tc, tmp_path / arch / "layer_1/width_80/average_l0_5",
                          config={"site": TC.name, "model": "tiny"})
        config = json.loads((folder / "config.json").read_text())
        assert config["d_out"] == 10 and config["architecture"] == arch
        loaded = saescope.load_sae(folder)
        assert type(loaded) is type(tc) and loaded.cfg.d_out == 10 and not loaded.cfg.centre_input
        for name in tc.array_names:
            torch.testing.assert_close(getattr(loaded, name), getattr(tc, name), rtol=0, atol=0)
        x = torch.randn(20, 12)
        torch.testing.assert_close(loaded(x), tc(x), rtol=0, atol=0)
        (released,) = saescope.load_release(tmp_path / arch)
        assert released.site == TC
