"""The decoder refit (saescope.train.refit): the least-squares decoder for fixed codes, exact."""

import pytest
import torch

from saescope.activations.source import InMemorySource
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site
from saescope.train.plan import TrainPlan
from saescope.train.recipe import Recipe
from saescope.train.refit import RefitStats, refit_decoder_
from saescope.train.spec import SAESpec
from saescope.train.trainer import TrainOptions, Trainer

SITE = Site(0, "resid_post")


def _sae(architecture, d_in=12, d_sae=40, seed=0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=6))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.threshold.fill_(0.2)
        sae.b_enc[-5:] = -1e3  # five latents that never fire
    return sae


@pytest.mark.parametrize("architecture", ["jumprelu", "batchtopk"])
def test_the_refit_is_the_least_squares_decoder_and_keeps_every_code(architecture):
    sae = _sae(architecture)
    x_ND = torch.randn(600, 12, generator=torch.Generator().manual_seed(1)) * 2 + 1
    with torch.no_grad():
        f_ND = sae.encode(x_ND)
    stats = RefitStats(40, 12)
    for x_BD in x_ND.split(128):
        stats.add(sae, x_BD)
    assert stats.n_tokens == 600
    with torch.no_grad():
        assert stats.mse_of(sae.W_dec, sae.b_dec) == pytest.approx(float((sae(x_ND) - x_ND).square().sum(1).mean()), rel=1e-5)
    fired = (f_ND > 0).any(0)
    assert 0 < int(fired.sum()) < 40  # some latents never fire here: their rows are kept
    kept_rows = sae.W_dec[~fired].clone()

    info = refit_decoder_(sae, stats, ridge=0.0)

    # the same latents fire on every token, each scaled by one positive factor
    with torch.no_grad():
        g_ND = sae.encode(x_ND)
    assert torch.equal(g_ND > 0, f_ND > 0)
    # the reconstruction is the least-squares fit of x on [f, 1], computed independently
    f1 = torch.cat([f_ND[:, fired], torch.ones(600, 1)], 1).double()
    W1 = torch.linalg.lstsq(f1, x_ND.double()).solution
    torch.testing.assert_close(sae(x_ND).double(), f1 @ W1, atol=1e-4, rtol=1e-4)
    assert info["refit_mse_after"] == pytest.approx(float((f1 @ W1 - x_ND).square().sum(1).mean()), rel=1e-4)
    assert info["refit_mse_after"] < info["refit_mse_before"]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))  # unit rows again
    torch.testing.assert_close(sae.W_dec[~fired], kept_rows)


def test_a_run_refits_after_training_and_releases_the_refit(tmp_path):
    from saescope.release import load_sae
    from saescope.train.run import train_and_release

    g = torch.Generator().manual_seed(0)
    data = {SITE: torch.randn(32 * 12, 12, generator=g) * 3 + 1}
    specs = [SAESpec(SITE, "batchtopk", 40, k=6)]

    def run(out, refit_tokens):
        recipe = Recipe(lr=3e-3, batch_size=32, scale_estimate_tokens=64, input_norm="diagonal",
                        refit_tokens=refit_tokens)
        trainer = Trainer(InMemorySource(data), specs, recipe, out, n_steps=12,
                          options=TrainOptions(progress=False, checkpoint_every=4), plan=TrainPlan())
        folders = train_and_release(trainer)
        return trainer, load_sae(folders[0])

    plain_run, plain = run(tmp_path / "plain", 0)
    refit_run, refit = run(tmp_path / "refit", 64)
    # training is untouched: the same encoder, so the same latents fire on raw activations
    x = data[SITE]
    with torch.no_grad():
        assert torch.equal(plain.encode(x) > 0, refit.encode(x) > 0)
    # the released decoder is the least-squares one for the released codes on the first 64
    # training tokens (the source's first two batches), in raw units
    first = torch.cat([b[SITE] for _, b in zip(range(2), InMemorySource(data).iter_batches(32, seed=0))])
    with torch.no_grad():
        f = refit.encode(first)
        live = (f > 0).any(0)
        f1 = torch.cat([f[:, live], torch.ones(len(f), 1)], 1).double()
        W1 = torch.linalg.lstsq(f1, first.double()).solution
        err_refit = (refit(first) - first).square().sum(1).mean()
        err_plain = (plain(first) - first).square().sum(1).mean()
    assert float(err_refit) < float(err_plain)
    # ridge 1e-3: within a fraction of a percent of the exact least-squares error
    assert float(err_refit) == pytest.approx(float((f1 @ W1 - first.double()).square().sum(1).mean()), rel=2e-2)
    metrics = refit_run.trainers[0].refit
    assert metrics["refit_tokens"] == 64 and metrics["refit_mse_after"] < metrics["refit_mse_before"]

    # a relaunch of the finished run redoes the refit from the last checkpoint: the same release
    again_run, again = run(tmp_path / "refit", 64)
    for name in refit.array_names:
        torch.testing.assert_close(getattr(again, name), getattr(refit, name), rtol=0, atol=0)


def test_the_refit_is_refused_where_it_cannot_keep_the_codes(tmp_path):
    data = {SITE: torch.randn(64, 12)}
    recipe = Recipe(batch_size=32, scale_estimate_tokens=32, refit_tokens=32)
    with pytest.raises(ValueError, match="topk SAEs cannot take it"):
        Trainer(InMemorySource(data), [SAESpec(SITE, "topk", 16, k=4)], recipe, tmp_path, n_steps=2)
    with pytest.raises(ValueError, match="refit_tokens must be >= 0"):
        Recipe(refit_tokens=-1)
