"""TopK, BatchTopK and ReLU baselines, the registry, and the contract every architecture meets."""

from __future__ import annotations

import copy

import pytest
import torch

from saescope.sae.base import SAE, SAEConfig
from saescope.sae.batchtopk import BatchTopKSAE
from saescope.sae.registry import ARCHITECTURES, build_sae
from saescope.sae.relu import ReLUSAE
from saescope.sae.topk import TopKSAE


pytestmark = pytest.mark.usefixtures("one_thread")


#: the SAE architectures (transcoders' loss takes a target: tests/test_transcoders.py tests them)
SAES = sorted(name for name, cls in ARCHITECTURES.items() if not cls.is_transcoder)


def make(architecture: str, d_in=16, d_sae=64, k=4, **kw) -> SAE:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **kw))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_registry_builds_every_architecture_and_refuses_unknown_ones():
    for name, cls in ARCHITECTURES.items():
        sae = build_sae(SAEConfig(d_in=8, d_sae=32, architecture=name, k=2))
        assert type(sae) is cls and sae.architecture == name
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        build_sae(SAEConfig(d_in=8, d_sae=32, architecture="gated"))
    with pytest.raises(ValueError, match="needs 1 <= k"):
        build_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk"))


@pytest.mark.parametrize("architecture", SAES)
def test_every_architecture_round_trips_its_own_config_and_builds(architecture):
    import json

    from saescope.sae.base import CONFIG_CLASSES

    own = CONFIG_CLASSES[architecture]
    options = {"k": 3, "aux_k": 5, "dead_tokens": 100} if hasattr(own, "k") else {}
    if hasattr(own, "bandwidth"):
        options = {"bandwidth": 0.01, "threshold_init": 0.02}
    cfg = own(d_in=8, d_sae=32, architecture=architecture, metadata={"site": "layer_0/resid_post"}, **options)
    saved = json.loads(json.dumps(cfg.to_dict()))  # what config.json holds
    for back in (SAEConfig.from_dict(saved), own.from_dict(saved)):
        assert type(back) is own and back == cfg
    # the old flat call and the old flat config.json give the architecture's own config
    flat = {"d_in": 8, "d_sae": 32, "architecture": architecture, "centre_input": True, "k": 3, "bandwidth": 0.01,
            "threshold_init": 0.02, "aux_k": 5, "aux_coefficient": 1 / 32, "dead_tokens": 100, "metadata": {},
            "target_l0": None, "max_frequency": None, "frequency_coefficient": 1.0, "frequency_window": 8,
            "prefixes": (), "a_later_option": 1}
    assert type(SAEConfig.from_dict(flat)) is own
    flat.pop("a_later_option")
    assert type(SAEConfig(**flat)) is own and SAEConfig(**flat).to_dict().keys() <= flat.keys()
    sae = build_sae(SAEConfig.from_dict(saved))
    assert type(sae) is ARCHITECTURES[architecture] and sae.cfg == cfg
    with pytest.raises(TypeError):
        SAEConfig(d_in=8, d_sae=32, architecture=architecture, no_such_option=1)


@pytest.mark.parametrize("architecture", SAES)
def test_contract_and_a_short_training_run(architecture):
    """loss() parts are consistent; a few recipe steps lower the loss; decoder rows stay unit."""
    sae = make(architecture)
    x = torch.randn(256, 16)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.0, 0.999))
    first = None
    for _ in range(60):
        out = sae.loss(x, 0.01)
        first = first if first is not None else float(out.total.detach())
        opt.zero_grad()
        out.total.backward()
        sae.remove_parallel_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
    torch.testing.assert_close(out.mse, (out.x_hat_BD - x).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.total.detach(), out.mse + out.sparsity + out.aux)
    assert out.fired_F.dtype == torch.int64 and out.fired_F.shape == (64,)
    assert out.fired_F.sum() == round(float(out.l0) * 256)
    assert float(out.total.detach()) < 0.8 * first
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_fold_for_every_architecture(architecture):
    """Raw-unit SAE on x == C × training SAE on x/C (latents and reconstruction)."""
    sae = make(architecture)
    if isinstance(sae, BatchTopKSAE):
        target = {"target_BD": torch.randn(64, 16)} if sae.is_transcoder else {}
        sae.loss(torch.randn(64, 16), 0.0, **target)  # estimate a threshold
        assert sae.threshold.min() > 0
    C = 4.2
    x = torch.randn(40, 16) * C
    released = copy.deepcopy(sae)
    released.fold_input_scale(C)
    with torch.no_grad():
        torch.testing.assert_close(released.encode(x), C * sae.encode(x / C), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(released(x), C * sae(x / C), rtol=1e-5, atol=1e-4)


def test_topk_keeps_k_latents_and_trains_dead_ones_with_auxk():
    sae = make("topk", k=3, aux_k=5, dead_tokens=100)
    x = torch.randn(32, 16)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 3).all() and (f >= 0).all()
    assert float(sae.loss(x).aux) == 0.0  # nobody is dead yet
    assert (sae.tokens_since_fired_F[sae.loss(x).fired_F > 0] == 0).all()

    sae.zero_grad()
    with torch.no_grad():
        sae.tokens_since_fired_F[:] = 0
        sae.tokens_since_fired_F[40:] = 1000  # latents 40.. are dead
    pre = sae.pre_activations(x)
    residual = torch.randn(32, 16)
    aux = sae.aux_loss(pre, residual)
    aux.backward()
    rows_with_grad = sae.W_dec.grad.abs().sum(1) > 0
    assert aux > 0 and rows_with_grad[40:].any()
    assert not rows_with_grad[:40].any(), "AuxK must only train dead latents"
    # its value: the top-5 dead latents of each token reconstructing the residual, by hand
    dead_pre = pre.detach().clone()
    dead_pre[:, :40] = float("-inf")
    vals, idx = dead_pre.topk(5, dim=-1)
    code = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    expected = (code @ sae.W_dec.detach() - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(aux.detach(), expected)

    before = sae.tokens_since_fired_F.clone()
    out = sae.loss(x)
    assert out.aux > 0
    assert torch.equal(before, sae.tokens_since_fired_F)  # the loss only reads the counter
    sae.update_dead_(out.fired_F, x.shape[0])  # the step advances it (SAETrainer, after each step)
    assert (sae.tokens_since_fired_F[out.fired_F > 0] == 0).all()
    assert (sae.tokens_since_fired_F[out.fired_F == 0] >= 32).all()


def test_batchtopk_keeps_k_per_token_on_average_and_estimates_a_threshold():
    sae = make("batchtopk", d_sae=128, k=4)
    x = torch.randn(200, 16)
    f = sae.encode_batch(x)
    assert int((f > 0).sum()) == 4 * 200
    counts = (f > 0).sum(-1)
    assert counts.max() > counts.min()  # per token it varies, which TopK would not allow
    assert torch.equal(sae.threshold, torch.zeros(128))
    for _ in range(20):
        sae.loss(torch.randn(200, 16))
    theta = sae.threshold
    assert theta.min() > 0 and torch.equal(theta, theta[0].expand_as(theta))
    # inference is JumpReLU with that θ: on fresh data it keeps about k per token
    l0 = (sae.encode(torch.randn(2000, 16)) > 0).sum(-1).float().mean()
    assert 2 <= l0 <= 8
    assert set(sae.to_arrays()) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def test_relu_penalty_is_l1_weighted_by_decoder_norms():
    sae = make("relu")
    assert isinstance(sae, ReLUSAE)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])  # rows of different norms
    x = torch.randn(30, 16)
    out = sae.loss(x, 0.25)
    f = sae.encode(x)
    expected = 0.25 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity, expected.detach())
    assert isinstance(make("topk"), TopKSAE)


def test_batchtopk_released_as_jumprelu_fires_the_same_latents_on_its_last_batch():
    """TopK → JumpReLU conversion: after training, the released JumpReLU (θ calibrated on the last
    batch, scale folded in) gives exactly the batch-level top-k code on that batch."""
    from saescope.sae.input_norm import InputNorm
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.train.recipe import Recipe
    from saescope.train.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = make("batchtopk", d_sae=128, k=4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, sae.cfg.d_in, generator=g) * 3 for _ in range(6)]
    trainer = SAETrainer(sae, Recipe.for_steps(6, lr=1e-2, batch_size=64), sparsity_coefficient=0.0, n_steps=6,
                         input_scale=3.0)
    for step, x in enumerate(batches):
        trainer.update(step, x, return_metrics=False)
    with torch.no_grad():
        trained_BF = sae._batch_topk(sae.pre_activations(batches[-1] / 3.0))
        sae.eval()
        released = copy.deepcopy(sae)
        released.fold_input_norm(InputNorm.from_scale(3.0, sae.cfg.d_in))
        released = released.to_jumprelu()
        assert isinstance(released, JumpReLUSAE) and released.cfg.metadata["trained_as"] == "batchtopk"
        f_BF = released.encode(batches[-1])
    assert torch.equal(f_BF != 0, trained_BF != 0)
    assert torch.allclose(f_BF, 3.0 * trained_BF, rtol=1e-5, atol=1e-5)
    assert trainer.released_l0 == pytest.approx(4.0)


def test_batch_top_values_is_exactly_topk():
    """The candidate-cut fast path picks exactly torch.topk's values and indices (and gradient)."""
    from saescope.sae.batchtopk import _top_values

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        acts = torch.randn(512 * 512, generator=g).relu().requires_grad_()
        values, indices = _top_values(acts, 512 * 20)
        ref_values, ref_indices = acts.topk(512 * 20, sorted=False)
        assert torch.equal(indices.sort().values, ref_indices.sort().values)
        assert torch.equal(values.sort().values, ref_values.sort().values)
        values.sum().backward()
        assert acts.grad.sum().item() == 512 * 20
