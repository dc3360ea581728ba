"""Harvest: the store holds exactly the activations of the kept tokens, resumes after a kill,
does nothing when finished, and refuses what it must refuse."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from saescope.activations.harvest import HarvestConfig, harvest
from saescope.sites import Site, capture, select_sites
from saescope.activations.store import MANIFEST, ActivationStore

CFG = HarvestConfig(shard_tokens=40, batch_seqs=3, progress=False)


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store (manifest aside) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def expected_rows(model, corpus, sites) -> dict[Site, torch.Tensor]:
    """Reference: capture each sequence on its own and keep the kept positions."""
    out = {s: [] for s in sites}
    for i in range(len(corpus)):
        acts = capture(model, sites, torch.as_tensor(corpus.input_ids[i : i + 1]))
        keep = torch.as_tensor(corpus.keep_mask[i])
        for s in sites:
            out[s].append(acts[s][0][keep])
    return {s: torch.cat(v) for s, v in out.items()}


def read_all(store: ActivationStore, site: Site) -> torch.Tensor:
    return torch.cat([store.read(site, g) for g in range(len(store.shards))])


def test_store_holds_the_kept_activations_exactly(tiny_model, tiny_corpus, tmp_path):
    model, corpus = tiny_model("gemma3"), tiny_corpus()
    sites = select_sites("all", 3)
    store = harvest(model, None, corpus, sites, tmp_path / "store", CFG)

    assert store.complete and store.sites == sites and store.n_tokens == corpus.n_tokens
    assert store.d_in[Site(1, "attn_z")] == 64 and store.d_in[Site(1, "resid_post")] == 48
    assert len(store.shards) == -(-corpus.n_tokens // 40)
    want = expected_rows(model, corpus, sites)
    for site in sites:
        torch.testing.assert_close(read_all(store, site), want[site], atol=1e-5, rtol=1e-5)
        assert (tmp_path / "store" / site.name / "shard_00000.npy").exists()

    tokens = store.tokens()
    seq, pos = np.nonzero(corpus.keep_mask)
    np.testing.assert_array_equal(tokens["seq"], seq)
    np.testing.assert_array_equal(tokens["pos"], pos)
    np.testing.assert_array_equal(tokens["token_id"], corpus.input_ids[seq, pos])
    np.testing.assert_array_equal(tokens["doc_id"], corpus.doc_ids[seq, pos])
    np.testing.assert_array_equal(tokens["subset_id"], corpus.subset_ids[seq, pos])
    assert not np.isin(tokens["token_id"], [0, 1, 2]).any()  # no BOS, EOS or padding stored

    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert manifest["config"]["model"] == "gemma3_text"
    assert manifest["config"]["corpus"] == "tiny" and manifest["config"]["seq_len"] == 16
    assert manifest["n_tokens"] == corpus.n_tokens and manifest["subsets"] == corpus.subsets
    assert all(len(f["sha256"]) == 64 for g in manifest["shards"] for f in g["files"].values())
    store.verify()


def test_bfloat16_store(tiny_model, tiny_corpus, tmp_path):
    model, corpus = tiny_model("gpt2"), tiny_corpus(n_seqs=4)
    sites = [Site(0, "mlp_out"), Site(1, "attn_z")]
    cfg = HarvestConfig(dtype="bfloat16", shard_tokens=16, batch_seqs=2, progress=False)
    store = harvest(model, None, corpus, sites, tmp_path / "s", cfg)
    want = expected_rows(model, corpus, sites)
    for site in sites:
        got = read_all(store, site)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want[site].to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    shard = np.load(tmp_path / "s" / "layer_0" / "mlp_out" / "shard_00000.npy")
    assert shard.dtype == np.uint16 and shard.shape == (16, 48)  # bf16 bit patterns, half the bytes


class Killed(Exception):
    pass


@pytest.mark.parametrize("writer_thread", [False, True])
def test_resume_after_a_kill_gives_the_same_store(tiny_model, tiny_corpus, tmp_path, writer_thread):
    model, corpus = tiny_model("llama"), tiny_corpus()
    sites = select_sites("resid_post,attn_z@1", 3)
    whole = harvest(model, None, corpus, sites, tmp_path / "whole", CFG)
    cfg = HarvestConfig(**{**vars(CFG), "writer_thread": writer_thread})
    assert len(whole.shards) >= 4

    def kill_after_two(index):
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        harvest(model, None, corpus, sites, tmp_path / "part", cfg, on_shard=kill_after_two)
    part = ActivationStore(tmp_path / "part")
    assert not part.complete and len(part.shards) == 2
    assert not list((tmp_path / "part").rglob(".*.tmp-*"))  # an interrupted run removes its partial files
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "part").rglob("shard_0000[01].npy")}
    assert len(finished) == 2 * len(sites)
    # what a kill in the middle of the next group leaves: one renamed file, one temporary file
    (tmp_path / "part" / "layer_0/resid_post/shard_00002.npy").write_bytes(b"half a shard")
    (tmp_path / "part" / "layer_1/attn_z/.shard_00002.npy.tmp-123").write_bytes(b"junk")

    written = []
    resumed = harvest(model, None, corpus, sites, tmp_path / "part", cfg, on_shard=written.append)
    assert written == list(range(2, len(whole.shards)))  # finished groups are not redone
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert resumed.complete
    assert store_files(tmp_path / "part") == store_files(tmp_path / "whole")
    assert resumed.shards == whole.shards
    resumed.verify()


def test_resume_after_sigkill_in_the_middle_of_a_shard(tiny_model, tiny_corpus, tmp_path):
    """A real SIGKILL while a shard file is half written, then a resume in another process."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import build_tiny_corpus, build_tiny_model
        from saescope.activations import harvest as H, writer as W
        from saescope.sites import select_sites
        writes = 0
        original = W._HashingFile.write
        def write(self, data):
            global writes
            writes += 1
            if writes == 100:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, data)
        W._HashingFile.write = write
        model = build_tiny_model("gpt_neox")
        cfg = H.HarvestConfig(shard_tokens=40, batch_seqs=3, progress=False)
        H.harvest(model, None, build_tiny_corpus(), select_sites("all", 3), sys.argv[1], cfg)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "part")], env=env, capture_output=True, text=True, check=False
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list((tmp_path / "part").rglob(".*.tmp-*")), "the kill should leave a half-written temporary file"
    killed_store = ActivationStore(tmp_path / "part")
    assert not killed_store.complete and 1 <= len(killed_store.shards) < 5
    model, corpus, sites = tiny_model("gpt_neox"), tiny_corpus(), select_sites("all", 3)
    cfg = HarvestConfig(shard_tokens=40, batch_seqs=3, progress=False)
    harvest(model, None, corpus, sites, tmp_path / "part", cfg)  # resume, in this process
    harvest(model, None, corpus, sites, tmp_path / "whole", cfg)
    assert not list((tmp_path / "part").rglob(".*.tmp-*"))
    assert store_files(tmp_path / "part") == store_files(tmp_path / "whole")
    ActivationStore(tmp_path / "part").verify()


def test_rerunning_a_finished_harvest_does_nothing(tiny_model, tiny_corpus, tmp_path):
    model, corpus = tiny_model("qwen2"), tiny_corpus(n_seqs=4)
    sites = [Site(2, "resid_post")]
    harvest(model, None, corpus, sites, tmp_path / "s", CFG)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    calls = []
    store = harvest(model, None, corpus, sites, tmp_path / "s", CFG, on_shard=calls.append)
    assert store.complete and calls == []
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == before


@pytest.mark.parametrize(
    "change, message",
    [
        ("sites", "sites differ"),
        ("weights", "the model's weights differ"),
        ("model", "model differs .store: 'mistral', requested: 'another-model'"),
        ("corpus", "the tokenized corpus differs"),
        ("dtype", "the storage dtype differs .dtype: store 'float32', requested 'bfloat16'"),
    ],
)
def test_a_store_of_another_configuration_is_refused(tiny_model, tiny_corpus, tmp_path, change, message):
    model, corpus = tiny_model("mistral"), tiny_corpus(n_seqs=4)
    sites, cfg = [Site(0, "resid_post"), Site(1, "mlp_out")], CFG
    harvest(model, None, corpus, sites, tmp_path / "s", cfg)
    before = store_files(tmp_path / "s")
    if change == "sites":
        sites = sites + [Site(2, "attn_z")]
    elif change == "weights":
        model = tiny_model("mistral", seed=1)
    elif change == "model":
        cfg = HarvestConfig(**{**vars(CFG), "model_name": "another-model"})
    elif change == "corpus":
        corpus = tiny_corpus(n_seqs=4, seed=5)
    else:
        cfg = HarvestConfig(**{**vars(CFG), "dtype": "bfloat16"})
    with pytest.raises(ValueError, match=message) as err:
        harvest(model, None, corpus, sites, tmp_path / "s", cfg)
    assert "another configuration" in str(err.value)
    assert store_files(tmp_path / "s") == before  # nothing already written is lost


def test_a_folder_with_other_files_is_refused(tiny_model, tiny_corpus, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no activation store"):
        harvest(tiny_model("gpt2"), None, tiny_corpus(n_seqs=2), [Site(0, "resid_post")], tmp_path / "s", CFG)


def test_not_enough_disk_fails_before_writing(tiny_model, tiny_corpus, tmp_path, monkeypatch):
    import shutil

    corpus = tiny_corpus(n_seqs=4)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(RuntimeError, match="not enough disk space") as err:
        harvest(tiny_model("gemma3"), None, corpus, select_sites("all", 3), tmp_path / "s", CFG)
    activations = corpus.n_tokens * 3 * (64 + 48 + 48) * 4  # tokens x sum of widths x 4 bytes
    message = str(err.value)
    assert "1000 bytes) free" in message
    estimate = int(re.search(r"\((\d+) bytes\) more", message).group(1))
    assert activations < estimate < activations + 20 * corpus.n_tokens + 1000  # plus per-token metadata
    assert not (tmp_path / "s").exists()


def test_bad_corpus_and_options(tiny_model, tiny_corpus, tmp_path):
    model = tiny_model("gpt2")
    corpus = tiny_corpus(n_seqs=2)
    empty = tiny_corpus(n_seqs=2)
    empty.keep_mask[:] = False
    with pytest.raises(ValueError, match="empty"):
        harvest(model, None, empty, [Site(0, "resid_post")], tmp_path / "a", CFG)
    with pytest.raises(ValueError, match="beyond the model's context of 256"):
        harvest(model, None, tiny_corpus(n_seqs=1, seq_len=300), [Site(0, "resid_post")], tmp_path / "b", CFG)
    other = tiny_corpus(n_seqs=2, vocab=1000)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        harvest(model, None, other, [Site(0, "resid_post")], tmp_path / "c", CFG)
    with pytest.raises(ValueError, match="out of range"):
        harvest(model, None, corpus, [Site(5, "resid_post")], tmp_path / "d", CFG)
    with pytest.raises(ValueError, match="unknown store dtype"):
        harvest(model, None, corpus, [Site(0, "resid_post")], tmp_path / "e", HarvestConfig(dtype="float16"))
    assert not any((tmp_path / n).exists() for n in "abcde")


@pytest.mark.slow
def test_cli_harvests_every_site_of_the_embedded_gemma(tmp_path, capsys):
    """End to end on the real Gemma 3 270M: all 54 sites of a few hundred wiki-vital tokens."""
    from saescope.cli import main
    from saescope.models import load_model
    from saescope.tokens import load_corpus

    argv = ["harvest", "--model", "gemma-3-270m", "--corpus", "wiki-vital", "--tokens", "300", "--seq-len", "128",
            "--shard-tokens", "128", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(argv + ["--sites", "all"]) == 0
    assert "54 sites x 300 tokens" in capsys.readouterr().out
    store = ActivationStore(tmp_path / "store")
    assert store.complete and len(store.sites) == 54 and store.n_tokens == 300 and len(store.shards) == 3
    assert store.d_in[Site(0, "attn_z")] == 1024 and store.d_in[Site(17, "resid_post")] == 640
    store.verify()

    model, tokenizer = load_model("gemma-3-270m")
    corpus = load_corpus("wiki-vital", tokenizer, seq_len=128, max_tokens=300)
    tokens = store.tokens()
    assert not np.isin(tokens["token_id"], [tokenizer.bos_token_id, tokenizer.eos_token_id]).any()
    rows = np.flatnonzero(tokens["seq"] == 1)  # the second sequence
    sites = [Site(0, "attn_z"), Site(17, "resid_post"), Site(9, "mlp_out")]
    acts = capture(model, sites, torch.as_tensor(corpus.input_ids[1:2]))
    for site in sites:
        stored = torch.cat([store.read(site, g) for g in range(3)])[rows]
        want = acts[site][0, tokens["pos"][rows]]  # one sequence alone: float rounding differs a little
        assert ((stored - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-4, site

    cfg = HarvestConfig(model_name="gemma-3-270m", shard_tokens=128, progress=False)
    with pytest.raises(ValueError, match="sites differ"):  # another site set: refused
        harvest(model, tokenizer, corpus, select_sites("resid_post", 18), tmp_path / "store", cfg)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")}
    assert harvest(model, tokenizer, corpus, store.sites, tmp_path / "store", cfg).complete  # finished: no-op
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "store").rglob("*")} == before
