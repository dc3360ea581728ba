"""Data integrity: a run's identity includes its data, every file read back is verified (the
newest damaged checkpoint falls back to the one before), output folders have one writer, and
what a killed release leaves behind is never read as an SAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from trainer_kit import SPECS, KillAt, make_data, trainer

from saescope.activations.source import InMemorySource
from saescope.errors import IntegrityError, LockedError, UserError
from saescope.locks import folder_lock
from saescope.train.checkpoint import CheckpointDir


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for x, y in zip(a.trainers, b.trainers)
               for p, q in zip(x.sae.parameters(), y.sae.parameters()))


@pytest.fixture
def killed_at_10(tmp_path):
    """A reference run, and one killed at step 10 (checkpoints of steps 4 and 8 on disk)."""
    source = InMemorySource(make_data())
    reference = trainer(source, tmp_path / "straight")
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(KillAt(source, 10), tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000000004", "step_000000008"]
    return source, reference, ckpt


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor's values
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bit": _flip_last_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "damaged header": lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(killed_at_10, damage, capsys):
    source, reference, ckpt = killed_at_10
    target = ckpt / "step_000000008" / f"{SPECS[0].name}.safetensors"
    DAMAGE[damage](target)
    resumed = trainer(source, ckpt.parent)
    resumed.fit()
    err = capsys.readouterr().err
    assert f"checkpoint file {target} is" in err and "earlier intact checkpoint step_000000004" in err
    assert _same_weights(reference, resumed)  # resumed from step 4: still bit-identical


def test_no_intact_checkpoint_left_is_an_error_naming_the_file(killed_at_10):
    source, _, ckpt = killed_at_10
    for step in ("step_000000004", "step_000000008"):
        _flip_last_byte(ckpt / step / "state.json")
    with pytest.raises(IntegrityError, match=r"step_000000008/state.json is damaged .*delete .*checkpoints to start"):
        trainer(source, ckpt.parent).fit()


def test_a_lost_pointer_resumes_from_the_newest_intact_checkpoint(killed_at_10, capsys):
    source, reference, ckpt = killed_at_10
    (ckpt / "latest.json").unlink()
    assert CheckpointDir(ckpt).latest()[0] == 8  # not a restart at step 0 over valid checkpoints
    resumed = trainer(source, ckpt.parent)
    resumed.fit()
    assert "latest.json is missing" in capsys.readouterr().err
    assert _same_weights(reference, resumed)
    log = [json.loads(line) for line in (ckpt.parent / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r.get("event") == "input_scales" and r["step"] == 0][1:]  # one start only


def test_a_resume_removes_what_a_kill_left_half_written(killed_at_10):
    """A kill between a checkpoint's rename and its pointer's rename leaves ``.latest.json.tmp-N``
    (and perhaps a checkpoint folder's temporary twin); the resume deletes both."""
    source, reference, ckpt = killed_at_10
    (ckpt / ".latest.json.tmp-5566").write_text('{"step": 12, "di')
    (ckpt / ".step_000000012.tmp-5566").mkdir()
    resumed = trainer(source, ckpt.parent)
    resumed.fit()
    assert not [p.name for p in ckpt.parent.rglob(".*") if ".tmp-" in p.name]
    assert _same_weights(reference, resumed)


def test_a_resume_on_other_data_is_refused_naming_it(killed_at_10):
    _, _, ckpt = killed_at_10
    other = InMemorySource(make_data(seed=1))
    with pytest.raises(UserError, match=r"different training run \(data.tensors_sha256: '[0-9a-f]{16}' -> "):
        trainer(other, ckpt.parent).fit()


@pytest.mark.parametrize("kind", ["store", "online"])
def test_a_resume_on_another_corpus_or_store_is_refused(tiny_model, tiny_corpus, tmp_path, kind):
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.activations.online import OnlineSource
    from saescope.activations.store import StoreReader
    from saescope.sites import Site
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    model, site = tiny_model("gemma3"), Site(1, "resid_post")
    corpora = [tiny_corpus(n_seqs=8, seed=0), tiny_corpus(n_seqs=8, seed=1)]
    if kind == "store":
        sources = [StoreReader(harvest(model, None, c, [site], tmp_path / f"store{i}",
                                       HarvestConfig(shard_tokens=32, progress=False)))
                   for i, c in enumerate(corpora)]
    else:
        sources = [OnlineSource(model, c, [site]) for c in corpora]

    def run(source):
        return Trainer(source, sweep([site], [16], architecture="jumprelu", sparsity_coefficients=[1e-3]), None,
                       tmp_path / "run", n_steps=4, options=TrainOptions(progress=False, checkpoint_every=2))

    run(sources[0]).fit()
    wanted = "store_sha256" if kind == "store" else "corpus_sha256"
    with pytest.raises(UserError, match=rf"data\.{wanted}: '[0-9a-f]+' -> '[0-9a-f]+'.*use another output folder"):
        run(sources[1]).fit()


def test_path_spellings_name_one_corpus_and_seed_one_shuffle(tmp_path, monkeypatch):
    from saescope.corpora import canonical_name, iter_documents

    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"d{i:02d}.txt").write_text(f"document number {i}")
    monkeypatch.chdir(tmp_path)
    spellings = ["docs", "./docs", "docs/", str(tmp_path / "docs")]
    assert len({canonical_name(s) for s in spellings}) == 1
    orders = {tuple(d.text for d in iter_documents(s, seed=3)) for s in spellings}
    assert len(orders) == 1
    assert next(iter(orders)) != tuple(f"document number {i}" for i in range(30))  # shuffled all the same


def test_run_json_is_written_at_start_and_guards_the_data(tmp_path, monkeypatch):
    from saescope.pipeline import RunState
    from saescope.presets import RunConfig

    (tmp_path / "c.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    state = RunState(tmp_path / "out", RunConfig(corpus="./c.txt"))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["stages"] == {}  # before any stage ends
    state.check_data("corpus", "aaaa")
    again = RunState(tmp_path / "out", RunConfig(corpus=str(tmp_path / "c.txt")))  # another spelling: same run
    with pytest.raises(UserError, match="corpus had content fingerprint aaaa; the corpus read now has bbbb"):
        again.check_data("corpus", "bbbb")
    with pytest.raises(UserError, match="corpus: '.*c.txt' there, 'wiki-vital' now"):
        RunState(tmp_path / "out", RunConfig(corpus="wiki-vital"))


# --- locks --------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from saescope.locks import folder_lock
with folder_lock(sys.argv[1]):
    (Path(sys.argv[1]) / ".shard_00000.npy.tmp-in-flight").write_bytes(b"half a shard")
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder(tiny_model, tiny_corpus, tmp_path):
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.sites import Site

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    folder = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"activation store {folder} is being written by another saescope "
                                              rf"process \(pid {holder.pid}\)"):
            harvest(tiny_model("gemma3"), None, tiny_corpus(n_seqs=4), [Site(0, "resid_post")], folder,
                    HarvestConfig(progress=False))
        assert (folder / ".shard_00000.npy.tmp-in-flight").exists()  # its files are left alone
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            trainer(InMemorySource(make_data()), folder).fit()
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(folder):  # a SIGKILLed holder's lock dies with it
        pass


# --- release folders and feature databases -------------------------------------------------------


def test_release_checksums_and_stale_temporary_folders(tmp_path):
    from saescope.release import find_sae_folders, load_sae, save_sae
    from saescope.release.save import release_trained
    from saescope.sae.base import SAEConfig
    from saescope.sae.registry import build_sae

    sae = build_sae(SAEConfig(8, 16, "jumprelu", centre_input=False))
    root = tmp_path / "release"
    folder = save_sae(sae, root / "resid_post/layer_0/width_16/average_l0_3", config={"site": "layer_0/resid_post"})
    ghost = root / "resid_post/layer_0/width_16/.average_l0_5.tmp-1234abcd"  # a release killed while writing
    ghost.mkdir()
    (ghost / "params.npz").write_bytes((folder / "params.npz").read_bytes())
    assert find_sae_folders(root) == [folder]  # eval, features and the canonical choice never see it
    release_trained([], root, model_name=None, recipe={}, batch_size=1)
    assert not ghost.exists()  # removed under the release's lock

    load_sae(folder)
    _flip_last_byte(folder / "params.npz")
    with pytest.raises(IntegrityError, match=r"release file .*average_l0_3/params.npz is damaged"):
        load_sae(folder)


def test_a_damaged_feature_database_is_refused(tmp_path):
    from saescope.features.store import FeatureStore, FeatureWriter

    writer = FeatureWriter(tmp_path / "features.sqlite")
    writer.set_meta(format_version=1)
    path = writer.close()
    assert FeatureStore(path).meta["format_version"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="feature database .*features.sqlite is damaged.*rerun `saescope features`"):
        FeatureStore(path)


def test_damaged_token_metadata_is_refused(tiny_model, tiny_corpus, tmp_path):
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.sites import Site

    store = harvest(tiny_model("gemma3"), None, tiny_corpus(n_seqs=4), [Site(0, "resid_post")], tmp_path / "s",
                    HarvestConfig(progress=False))
    assert np.array_equal(store.tokens()["seq"], np.nonzero(tiny_corpus(n_seqs=4).keep_mask)[0])
    _flip_last_byte(tmp_path / "s" / "tokens.safetensors")
    with pytest.raises(IntegrityError, match="token metadata .*tokens.safetensors.*rerun the same harvest"):
        store.tokens()
