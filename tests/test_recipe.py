"""The recipe's defaults are the paper's, its schedules have the paper's shape, and the short-run
rule caps warm-ups as documented."""

import math

import pytest

from saescope.train.recipe import Recipe


def test_defaults_are_gemma_scope():
    r = Recipe()
    assert (r.lr, r.adam_beta1, r.adam_beta2, r.adam_eps) == (7e-5, 0.0, 0.999, 1e-8)
    assert (r.lr_warmup_steps, r.lr_warmup_start, r.sparsity_warmup_steps) == (1000, 0.1, 10_000)
    assert (r.batch_size, r.dtype, r.threshold_init, r.bandwidth) == (4096, "float32", 0.001, 0.001)
    assert r.lr_decay_fraction == 0.0  # the paper describes no decay


def test_lr_cosine_warmup_then_constant():
    r = Recipe()
    assert r.lr_at(0) == pytest.approx(0.1 * 7e-5)
    # halfway through a cosine warm-up: exactly the midpoint of 0.1·lr and lr
    assert r.lr_at(500) == pytest.approx(0.55 * 7e-5)
    # cosine, not linear: a quarter of the way the rise is (1 − cos(π/4))/2 ≈ 14.6% of the gap
    assert r.lr_at(250) == pytest.approx(7e-5 * (0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2))
    assert r.lr_at(250) < 7e-5 * (0.1 + 0.9 * 0.25)
    values = [r.lr_at(s) for s in range(1001)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising during warm-up
    for step in (1000, 1001, 50_000, 4_000_000):
        assert r.lr_at(step, 4_000_000) == 7e-5  # constant after: no decay by default


def test_optional_lr_decay():
    r = Recipe(lr_decay_fraction=0.2, lr_decay_final=0.0)
    n = 10_000
    assert r.lr_at(7_999, n) == 7e-5
    assert r.lr_at(9_000, n) == pytest.approx(0.5 * 7e-5)
    assert r.lr_at(9_999, n) < 1e-3 * 7e-5
    with pytest.raises(ValueError, match="n_steps"):
        r.lr_at(10)


def test_sparsity_coefficient_linear_warmup():
    r = Recipe()
    assert r.sparsity_factor_at(0) == 0.0
    assert r.sparsity_factor_at(2_500) == 0.25
    assert r.sparsity_factor_at(9_999) == pytest.approx(0.9999)
    assert r.sparsity_factor_at(10_000) == r.sparsity_factor_at(10**7) == 1.0
    assert Recipe(sparsity_warmup_steps=0).sparsity_factor_at(0) == 1.0


def test_short_run_rule_caps_warmups():
    short = Recipe.for_steps(2_000)
    assert (short.lr_warmup_steps, short.sparsity_warmup_steps) == (100, 400)  # 5% and 20%
    assert short.lr_at(100) == short.lr
    assert short.sparsity_factor_at(400) == 1.0
    # long runs keep the paper's values; the rule never lengthens a warm-up
    long = Recipe.for_steps(1_000_000)
    assert (long.lr_warmup_steps, long.sparsity_warmup_steps) == (1_000, 10_000)
    assert Recipe.for_steps(50_000).sparsity_warmup_steps == 10_000
    assert Recipe.for_steps(49_000).sparsity_warmup_steps == 9_800
    # explicit settings win over the rule
    assert Recipe.for_steps(2_000, lr_warmup_steps=7, batch_size=64).lr_warmup_steps == 7
    assert Recipe.for_steps(2_000, batch_size=64).batch_size == 64
    with pytest.raises(ValueError):
        Recipe.for_steps(0)


def test_round_trip_and_bad_values():
    r = Recipe.for_steps(3_000, dtype="bfloat16")
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="unknown recipe field"):
        Recipe.from_dict({**r.to_dict(), "learning_rate": 1.0})
    with pytest.raises(ValueError, match="dtype"):
        Recipe(dtype="float16")
    with pytest.raises(ValueError, match="lr"):
        Recipe(lr=0)
    with pytest.raises(ValueError, match="betas"):
        Recipe(adam_beta2=1.0)


def test_b_dec_mean_init_uses_the_first_batch():
    import torch

    from saescope.sae.base import SAEConfig
    from saescope.sae.registry import build_sae
    from saescope.train.recipe import Recipe
    from saescope.train.sae_trainer import SAETrainer

    torch.manual_seed(0)
    x_BD = torch.randn(64, 8) * 3 + 5
    recipe = Recipe.for_steps(10, lr=1e-9, b_dec_init="mean", batch_size=64)
    sae = build_sae(SAEConfig(d_in=8, d_sae=16))
    trainer = SAETrainer(sae, recipe, sparsity_coefficient=0.0, n_steps=10, input_scale=2.0)
    trainer.update(0, x_BD)
    # b_dec starts at the batch mean in normalised units (lr is tiny: the step barely moves it)
    assert torch.allclose(sae.b_dec, x_BD.mean(0) / 2.0, atol=1e-4)
    with pytest.raises(ValueError, match="b_dec_init"):
        Recipe(b_dec_init="median")
    with pytest.raises(ValueError, match="data-parallel"):
        SAETrainer(build_sae(SAEConfig(d_in=8, d_sae=16)), recipe, sparsity_coefficient=0.0, n_steps=10,
                   reduce_grads=lambda sae: None)
