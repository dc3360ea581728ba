"""Store reader and online stream: shuffled, deterministic, resumable, bounded, checksummed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from saescope.activations.source import BatchSource
from saescope.activations.harvest import HarvestConfig, harvest
from saescope.sites import Site, select_sites
from saescope.activations.store import ActivationStore, StoreReader
from saescope.activations.online import OnlineSource
from saescope.errors import IntegrityError

SITES = select_sites("resid_post,attn_z@1", 3)


@pytest.fixture(scope="module")
def model():
    from conftest import build_tiny_model

    return build_tiny_model("gemma3")


@pytest.fixture(scope="module")
def corpus():
    from conftest import build_tiny_corpus

    return build_tiny_corpus(n_seqs=20, seq_len=16)


@pytest.fixture(scope="module")
def store_path(model, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    harvest(model, None, corpus, SITES, path, HarvestConfig(shard_tokens=32, batch_seqs=4, progress=False))
    return path


def all_rows(store: ActivationStore) -> dict[Site, torch.Tensor]:
    return {s: torch.cat([store.read(s, g) for g in range(len(store.shards))]) for s in store.sites}


def row_ids(batch_x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index in ``table`` of every row of ``batch_x``: rows must match bit for bit."""
    index = {row.numpy().tobytes(): i for i, row in enumerate(table)}
    assert len(index) == len(table), "store rows should be distinct"
    return torch.tensor([index[row.numpy().tobytes()] for row in batch_x])


def take(it, n):
    return [next(it) for _ in range(n)]


def test_reader_is_a_batch_source_and_one_epoch_is_a_permutation(store_path):
    reader = StoreReader(store_path, buffer_tokens=64)  # several buckets, several chunks each
    assert isinstance(reader, BatchSource)
    assert reader.sites == SITES and reader.d_in[Site(1, "attn_z")] == 64
    table = all_rows(reader.store)
    n = reader.n_tokens
    batch = 10
    batches = take(reader.iter_batches(batch, seed=3), 2 * n // batch + 1)  # two epochs and a bit
    assert all(b[s].shape == (batch, reader.d_in[s]) and b[s].dtype == torch.float32 for b in batches for s in SITES)
    ids = {s: torch.cat([row_ids(b[s], table[s]) for b in batches]) for s in SITES}
    first = ids[SITES[0]]
    for s in SITES[1:]:  # all sites of a batch come from the same tokens
        assert torch.equal(ids[s], first)
    assert sorted(first[:n].tolist()) == list(range(n))  # epoch 0: every row exactly once
    assert sorted(first[n : 2 * n].tolist()) == list(range(n))  # epoch 1 too
    assert not torch.equal(first[:n], first[n : 2 * n])  # reshuffled per epoch
    assert not torch.equal(first[:n], torch.arange(n))  # actually shuffled


def test_reader_is_deterministic_and_resumes_with_skip_batches(store_path):
    reader = StoreReader(store_path, buffer_tokens=64)
    a = take(reader.iter_batches(16, seed=1), 30)  # crosses an epoch boundary
    b = take(StoreReader(store_path, buffer_tokens=64, prefetch=False).iter_batches(16, seed=1), 30)
    c = take(reader.iter_batches(16, seed=2), 30)
    for x, y in zip(a, b):
        assert all(torch.equal(x[s], y[s]) for s in SITES)
    assert not all(torch.equal(x[SITES[0]], y[SITES[0]]) for x, y in zip(a, c))
    for skip in (0, 5, 17, 29):
        tail = take(reader.iter_batches(16, seed=1, skip_batches=skip), 30 - skip)
        for x, y in zip(a[skip:], tail):
            assert all(torch.equal(x[s], y[s]) for s in SITES)


def test_reader_buckets_are_bounded_and_mix_shards(store_path):
    reader = StoreReader(store_path, sites=["layer_0/resid_post"], buffer_tokens=48)
    assert reader.sites == [Site(0, "resid_post")]
    buckets = reader._plan(seed=0, epoch=0)
    assert sum(b.rows for b in buckets) == reader.n_tokens
    assert all(b.rows <= 48 for b in buckets)
    assert any(len({g for g, _, _ in b.pieces}) > 1 for b in buckets)  # rows from several shards


def test_reader_loads_only_what_it_needs(store_path, monkeypatch):
    """Memory is bounded by the bucket: no read ever spans more than a bucket's rows, and skipping
    batches reads nothing for the skipped buckets."""
    reader = StoreReader(store_path, buffer_tokens=40, prefetch=False)
    loaded = []
    original = reader._load
    monkeypatch.setattr(reader, "_load", lambda bucket, epoch=0: loaded.append(bucket.rows) or original(bucket, epoch))
    take(reader.iter_batches(8, seed=0), 3)
    assert loaded and max(loaded) <= 40
    loaded.clear()
    take(reader.iter_batches(8, seed=0, skip_batches=1000), 1)
    assert len(loaded) <= 2


def test_bfloat16_reader_gives_float32(model, corpus, tmp_path):
    path = tmp_path / "bf16"
    harvest(model, None, corpus, SITES[:1], path, HarvestConfig(dtype="bfloat16", shard_tokens=50, progress=False))
    batch = next(StoreReader(path).iter_batches(32))
    x = batch[SITES[0]]
    assert x.dtype == torch.float32 and torch.equal(x, x.to(torch.bfloat16).float())


def test_corrupted_shard_is_named_on_read_and_by_verify(store_path, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(store_path, path)
    shard = path / "layer_1" / "attn_z" / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupted or missing files: layer_1/attn_z/shard_00001.npy$"):
        ActivationStore(path).verify()
    reader = StoreReader(path, buffer_tokens=10**6)
    with pytest.raises(IntegrityError, match="corrupted shard layer_1/attn_z/shard_00001.npy"):
        next(reader.iter_batches(8))
    # the other sites' shards are fine
    next(StoreReader(path, sites=[Site(0, "resid_post")]).iter_batches(8))

    (path / "layer_0" / "resid_post" / "shard_00000.npy").unlink()
    with pytest.raises(IntegrityError, match="missing shard .*layer_0/resid_post/shard_00000.npy"):
        next(StoreReader(path, sites=[Site(0, "resid_post")]).iter_batches(8))


def test_reader_refuses_incomplete_store_and_unknown_sites(model, corpus, store_path, tmp_path):
    class Stop(Exception):
        pass

    def stop(index):
        raise Stop

    with pytest.raises(Stop):
        harvest(model, None, corpus, SITES, tmp_path / "s", HarvestConfig(shard_tokens=32, progress=False), on_shard=stop)
    with pytest.raises(RuntimeError, match="incomplete"):
        StoreReader(tmp_path / "s")
    with pytest.raises(ValueError, match="not in the activation store .*layer_2/attn_z"):
        StoreReader(store_path, sites=[Site(2, "attn_z")])
    with pytest.raises(FileNotFoundError, match="no activation store"):
        StoreReader(tmp_path / "nothing")


def test_online_source_matches_the_store(model, corpus, store_path):
    online = OnlineSource(model, corpus, SITES, seqs_per_forward=3, buffer_tokens=60)
    assert isinstance(online, BatchSource)
    assert online.sites == SITES and online.d_in == StoreReader(store_path).d_in
    table = all_rows(ActivationStore(store_path))
    n = online.n_tokens
    batches = take(online.iter_batches(8, seed=0), n // 8)
    ids = {s: torch.cat([row_ids(b[s], table[s]) for b in batches]) for s in SITES}
    assert all(torch.equal(ids[s], ids[SITES[0]]) for s in SITES)
    assert len(set(ids[SITES[0]].tolist())) == len(ids[SITES[0]])  # no row twice within an epoch
    again = take(online.iter_batches(8, seed=0, skip_batches=4), 3)
    for x, y in zip(batches[4:], again):
        assert all(torch.equal(x[s], y[s]) for s in SITES)
    other = next(online.iter_batches(8, seed=1))
    assert not torch.equal(other[SITES[0]], batches[0][SITES[0]])


def test_online_source_bad_input(model, corpus):
    with pytest.raises(ValueError, match="out of range"):
        OnlineSource(model, corpus, [Site(7, "mlp_out")])
    with pytest.raises(ValueError, match="batch_size"):
        next(OnlineSource(model, corpus, SITES).iter_batches(0))
    empty = type(corpus)(corpus.input_ids, corpus.doc_ids, corpus.subset_ids, np.zeros_like(corpus.keep_mask), [], "e")
    with pytest.raises(ValueError, match="empty"):
        OnlineSource(model, empty, SITES)
