"""saescope.precision: a bf16 request runs in float32 on a CPU without bf16 matrix units."""

import pytest
import torch

from saescope import precision
from saescope.sae.jumprelu import JumpReLUSAE
from saescope.sae.base import SAEConfig
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer


def test_the_dtype_that_runs(monkeypatch):
    monkeypatch.setenv(precision.ENV, "0")
    assert precision.effective_dtype("bfloat16", "cpu") == "float32"
    assert precision.autocast_dtype("bfloat16", "cpu") is None
    assert precision.effective_dtype("float32", "cpu") == "float32"
    # off the CPU a bf16 request is kept whatever the flags say
    assert precision.effective_dtype("bfloat16", "cuda") == "bfloat16"
    monkeypatch.setenv(precision.ENV, "1")
    assert precision.autocast_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.delenv(precision.ENV)
    assert precision.bf16_runs_natively("cpu") == precision.cpu_has_bf16_units()


def test_the_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    for flags, want in (("fpu sse2 avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(precision, "Path", lambda _path, info=info: info)
        precision.cpu_has_bf16_units.cache_clear()
        assert precision.cpu_has_bf16_units() is want, flags
    precision.cpu_has_bf16_units.cache_clear()


def _train(recipe, steps=4):
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=16, d_sae=32))
    x_ND = torch.randn(steps * 32, 16, generator=torch.Generator().manual_seed(1))
    trainer = SAETrainer(sae, recipe, sparsity_coefficient=1e-3, n_steps=steps)
    for step, x_BD in enumerate(x_ND.split(32)):
        trainer.update(step, x_BD)
    return sae


def test_a_bf16_recipe_trains_exactly_as_float32_without_bf16_units(monkeypatch, capsys):
    recipe = Recipe(lr=1e-2)
    monkeypatch.setenv(precision.ENV, "0")
    precision._notice_once.cache_clear()
    fp32, asked_bf16 = _train(recipe), _train(recipe.replace(dtype="bfloat16"))
    assert all(torch.equal(a, b) for a, b in zip(fp32.parameters(), asked_bf16.parameters()))
    assert capsys.readouterr().err.count("no bf16 matrix units") == 1  # one notice, not one per SAE
    monkeypatch.setenv(precision.ENV, "1")
    forced = _train(recipe.replace(dtype="bfloat16"))
    assert not all(torch.equal(a, b) for a, b in zip(fp32.parameters(), forced.parameters()))
