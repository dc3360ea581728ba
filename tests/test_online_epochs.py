"""The online source with per-site epochs (``site_rows``): later epochs leave out the sites no
longer read, and the rows of sites read again come from the first pass's cache — the same
batches as recomputing them, with no model forward after the first pass."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from saescope.activations import online as online_mod
from saescope.activations.online import OnlineSource
from saescope.settings import TrainSettings
from saescope.sites import Site, select_sites

SITES = select_sites("resid_post@0-2,mlp_out@1", 3)
MLP = Site(1, "mlp_out")
B = 8


@pytest.fixture(scope="module")
def model():
    from conftest import build_tiny_model

    return build_tiny_model("gemma3")


@pytest.fixture(scope="module")
def corpus():
    from conftest import build_tiny_corpus

    return build_tiny_corpus(n_seqs=20, seq_len=16)


def take(it, n):
    return [next(it) for _ in range(n)]


def count_forwards(monkeypatch) -> list[list[Site]]:
    calls: list[list[Site]] = []
    real = online_mod.capture_kept

    def spy(model, sites, *args, **kwargs):
        calls.append(list(sites))
        return real(model, sites, *args, **kwargs)

    monkeypatch.setattr(online_mod, "capture_kept", spy)
    return calls


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_epochs_give_the_recomputed_batches_without_a_forward(model, corpus, tmp_path, monkeypatch, on_disk):
    plain = OnlineSource(model, corpus, SITES, seqs_per_forward=3, buffer_tokens=50)
    epoch_rows = int(corpus.keep_mask.sum())
    n_epoch = epoch_rows // B
    site_rows = {s: n_epoch * B for s in SITES} | {MLP: 3 * n_epoch * B}
    cached = OnlineSource(model, corpus, SITES, seqs_per_forward=3, buffer_tokens=50, site_rows=site_rows,
                          cache_dir=tmp_path if on_disk else None)
    assert cached.cache is not None and cached.cache.sites == [MLP]
    want = take(plain.iter_batches(B, seed=3), 3 * n_epoch)
    calls = count_forwards(monkeypatch)
    got = take(cached.iter_batches(B, seed=3), 3 * n_epoch)
    for i, (x, y) in enumerate(zip(want, got)):
        # the batch that straddles the first epoch's end holds only the sites still read
        sites = SITES if (i + 1) * B <= epoch_rows else [MLP]
        assert sorted(y) == sites, i
        assert all(torch.equal(x[s], y[s]) for s in sites), i
    n_buckets = len(cached._plan(3, 0))
    # forwards of <= 3 sequences, within buckets, over the first pass only
    assert -(-len(corpus) // 3) <= len(calls) <= -(-len(corpus) // 3) + n_buckets, len(calls)
    assert all(sites == SITES for sites in calls)
    if on_disk:
        assert os.listdir(tmp_path) == []  # unlinked files: nothing left behind


def test_a_resumed_stream_recomputes_what_the_cache_lacks(model, corpus):
    epoch_rows = int(corpus.keep_mask.sum())
    site_rows = {s: epoch_rows for s in SITES} | {MLP: 2 * epoch_rows + B}
    plain = OnlineSource(model, corpus, SITES, buffer_tokens=40)
    start = epoch_rows // B + 2  # inside the second pass: the cache is empty there
    want = take(plain.iter_batches(B, seed=1, skip_batches=start), 6)
    resumed = OnlineSource(model, corpus, SITES, buffer_tokens=40, site_rows=site_rows)
    got = take(resumed.iter_batches(B, seed=1, skip_batches=start), 6)
    for x, y in zip(want, got):
        assert sorted(y) == [MLP] and torch.equal(x[MLP], y[MLP])
    assert resumed.cache.filled.any() and not resumed.cache.filled.all()


def test_sites_at_and_the_settings_rows(model, corpus):
    rows = TrainSettings(kind_epochs=("mlp_out=3",), batch_size=B).site_rows(SITES, n_steps=10)
    assert rows[MLP] == 240 and rows[Site(0, "resid_post")] == 80
    source = OnlineSource(model, corpus, SITES, site_rows={MLP: 1})
    assert source.sites_at(0) == SITES
    assert source.sites_at(1) == [s for s in SITES if s != MLP]  # a site missing from site_rows: always
    assert source.cache is None  # nothing read twice
    everything = OnlineSource(model, corpus, SITES, site_rows=None)
    assert everything.sites_at(5) == SITES and everything.cache is None


def test_transcoder_sites_stand_for_the_sites_they_read(model, corpus):
    tc = select_sites("transcoder@1", 3)
    source = OnlineSource(model, corpus, tc, site_rows={tc[0]: 10 ** 6})
    assert set(source.site_rows) == set(source.sites) == {Site(1, "mlp_in"), MLP}
    assert source.cache is not None and set(source.cache.sites) == set(source.sites)
    rows = np.asarray(source.cache.offsets)
    assert rows[-1] == int(corpus.keep_mask.sum())


def test_a_run_with_more_mlp_out_epochs_trains_the_same_saes_from_the_cache(model, corpus, tmp_path):
    """The trainer on a source told the per-site rows (and caching mlp_out) trains exactly the
    SAEs it trains on a source that runs the model every epoch."""
    from saescope.train.recipe import Recipe
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    sites = select_sites("resid_post@0,mlp_out@1", 3)
    settings = TrainSettings(kind_epochs=("mlp_out=2",), batch_size=B, architecture="batchtopk")
    n_steps = int(corpus.keep_mask.sum()) // B
    recipe = Recipe.for_steps(n_steps, **settings.recipe_overrides(),
                              scale_estimate_tokens=2 * B)
    runs = []
    for name, rows in (("plain", None), ("cached", settings.site_rows(sites, n_steps))):
        source = OnlineSource(model, corpus, sites, buffer_tokens=50, site_rows=rows)
        specs = sweep(sites, (32,), architecture="batchtopk", ks=(4,), seed=0)
        trainer = Trainer(source, specs, recipe, tmp_path / name, n_steps=n_steps,
                          options=TrainOptions(device="cpu", progress=False, checkpoint_every=10 ** 6))
        runs.append({t.name: t for t in (trainer.fit() and trainer.trainers)})
    plain, cached = runs
    assert {t.n_steps for t in cached.values()} == {n_steps, 2 * n_steps}
    for name, t in plain.items():
        for (key, p), q in zip(t.sae.named_parameters(), cached[name].sae.parameters()):
            assert torch.equal(p, q), f"{name}: {key}"


def test_close_frees_the_cache(model, corpus, tmp_path):
    source = OnlineSource(model, corpus, SITES, site_rows={MLP: 10 ** 6}, cache_dir=tmp_path)
    files = list(source.cache._files)
    source.close()
    assert source.cache is None and all(f.closed for f in files)
    source.close()  # twice is fine
    assert sorted(next(source.iter_batches(B))) == SITES  # still a source: it computes again
