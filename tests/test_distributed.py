"""torchrun scaling, tested with 2 CPU processes (gloo) launched from pytest.

One launch of tests/distributed_worker.py per scenario (so one failure does not take the others
down); the harvest and one data-parallel run are launched twice, the first time losing rank 1.
The tests recompute each result in this single process and compare:

* distributed harvest == single-process harvest, byte for byte;
* site-parallel training == single-process training of the same SAEs, bit for bit;
* data-parallel, 2 ranks × 16 rows == 1 process × 32 rows, within float rounding;
* latent-sharded SAE == unsharded (init, forward, loss, gradients, trained weights), and
  latent-parallel training releases what one device would;
* online site-parallel == one process fed the same rows, bit for bit, also when a rank owns no
  SAE in a run shorter than the input-scale estimate (it serves the batches its peers read).

The killed launches fail naming the rank, and the relaunch finishes with the uninterrupted run's
results (the resumed store equals the single-process one; resumed training equals, bit for bit,
the uninterrupted run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as w
import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import build_tiny_corpus, build_tiny_model

from saescope.activations.harvest import HarvestConfig, harvest
from saescope.distributed.assign import assign_specs
from saescope.distributed.env import DistEnv, init_distributed, maybe_inject_failure
from saescope.locks import LOCK_FILE
from saescope.sites import Site
from saescope.train.checkpoint import CheckpointDir
from saescope.train.run import train_and_release
from saescope.train.spec import SAESpec, sweep

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")
REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    """Two CPU workers of tests/distributed_worker.py on the loopback interface."""
    with socket.socket() as s:  # a free port (released just before torchrun binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(Path(__file__).with_name("distributed_worker.py")),
           *args]
    full_env = {k: v for k, v in os.environ.items() if k != w.FAILURE_VAR_NAME}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"




@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The reference store (one process), shared by every scenario's launch."""
    out = tmp_path_factory.mktemp("distributed")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harvest(build_tiny_model(**w.MODEL), None, build_tiny_corpus(**w.CORPUS), w.SITES, out / "store",
                HarvestConfig(**w.HARVEST))
    finally:
        torch.set_num_threads(before)
    return out


def launch(scenario: str, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = torchrun(scenario, str(out), env=env)
    if env is None:
        assert proc.returncode == 0, output(proc)
    return proc


@pytest.fixture(scope="module")
def harvested(out):
    """The distributed harvest: killed once (rank 1 fails after its second shard group), with
    what it left, then relaunched to finish."""
    proc = launch("harvest", out, env={w.FAILURE_VAR_NAME: "rank=1,step=5,at=shard"})
    killed = (proc, sorted(p.name for p in (out / "store_dist/.harvest_parts").glob("*.json")),
              json.loads((out / "store_dist/manifest.json").read_text())["complete"])
    launch("harvest", out)
    return out, killed


@pytest.fixture(scope="module")
def data_parallel(out):
    launch("dp", out)
    return out


@pytest.fixture(scope="module")
def resumed(data_parallel):
    """Data-parallel training SIGKILLed at batch 5 on rank 1, then relaunched."""
    out = data_parallel
    proc = launch("dp_resumed", out, env={w.FAILURE_VAR_NAME: "rank=1,step=5,mode=kill"})
    latest = CheckpointDir(out / "dp_resumed/checkpoints").latest()
    launch("dp_resumed", out)
    return out, (proc, latest and latest[0])


@pytest.fixture(scope="module")
def launched(out, request):
    """``out`` after the launch of the scenario the test names with ``@pytest.mark.scenario``."""
    launch(request.param, out)
    return out


def scenario(name: str):
    return pytest.mark.parametrize("launched", [name], indirect=True)


def final_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = CheckpointDir(run / "checkpoints")
    return ckpt.load(ckpt.latest()[1])[1]


def store_contents(root: Path) -> tuple[dict[str, bytes], list[dict], bool]:
    manifest = json.loads((root / "manifest.json").read_text())
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in ("manifest.json", LOCK_FILE)}  # the lock names its holder's pid
    return files, sorted(manifest["shards"], key=lambda g: g["index"]), manifest["complete"]


# --- distributed (2 processes) ------------------------------------------------------------------


def test_distributed_harvest_equals_single_process(harvested):
    launched = harvested[0]
    files, shards, complete = store_contents(launched / "store_dist")
    ref_files, ref_shards, ref_complete = store_contents(launched / "store")
    assert complete and ref_complete
    assert shards == ref_shards  # same groups, rows, files and SHA-256
    assert files.keys() == ref_files.keys() and all(files[k] == ref_files[k] for k in files)


@scenario("site")
def test_site_parallel_training_is_bit_identical(launched, one_thread, tmp_path):
    from saescope.activations.store import StoreReader
    from saescope.train.trainer import Trainer

    train_and_release(Trainer(StoreReader(launched / "store", prefetch=False), w.SITE_SPECS, w.RECIPE, tmp_path,
                              **w.TRAIN_KW))
    want = final_state(tmp_path)
    got = {**final_state(launched / "site/ranks/rank_0"), **final_state(launched / "site/ranks/rank_1")}
    assert sorted(got) == sorted(want) == sorted(s.name for s in w.SITE_SPECS)
    for name in want:  # parameters, Adam moments, counters
        assert want[name].keys() == got[name].keys()
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)
    # each rank read only its own sites; rank 0 gathered the release folders and one summary
    layout = json.loads((launched / "site/parallel.json").read_text())
    site_of = {s.name: s.site for s in w.SITE_SPECS}
    sites_of = [{site_of[name] for name in names} for names in layout["ranks"]]
    assert sites_of[0] and sites_of[1] and not sites_of[0] & sites_of[1]
    summary = json.loads((launched / "site/train_summary.json").read_text())
    ref_summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert {s["sae"]: s["metrics"] for s in summary["saes"]} == {s["sae"]: s["metrics"] for s in ref_summary["saes"]}
    for entry in summary["saes"]:
        folder = Path(entry["folder"])
        assert folder.parent.parent.parent.parent == launched / "site/release"
        ref = np.load(tmp_path / Path(entry["folder"]).relative_to(launched / "site") / "params.npz")
        got_arrays = np.load(folder / "params.npz")
        assert all(np.array_equal(ref[k], got_arrays[k]) for k in ref.files)
    assert not (launched / "site/ranks/rank_0/release").exists()


def test_data_parallel_equals_one_process_with_the_global_batch(data_parallel, one_thread, tmp_path):
    from saescope.train.trainer import Trainer

    launched = data_parallel
    train_and_release(Trainer(w.dp_source(), w.DP_SPECS, w.dp_recipe(), tmp_path, **dict(w.TRAIN_KW, n_steps=w.DP_STEPS)))
    want, got = final_state(tmp_path), final_state(launched / "dp")
    init = w.initial_weights(w.DP_SPECS[0])
    for name in want:
        for key in (k for k in want[name] if k.startswith("sae.")):
            torch.testing.assert_close(got[name][key], want[name][key], rtol=1e-5, atol=1e-6)
        moved = (want[name]["sae.W_dec"] - init["W_dec"]).abs().max()
        assert moved > 1e-3  # the comparison is about trained weights, not the initialisation
    # released metrics and token counts cover both ranks (rank 0 wrote the only summary)
    state = json.loads((launched / "dp/checkpoints" / CheckpointDir(launched / "dp/checkpoints").latest()[1].name
                        / "state.json").read_text())
    assert state["step"] == w.DP_STEPS
    summary = json.loads((launched / "dp/train_summary.json").read_text())
    ref = json.loads((tmp_path / "train_summary.json").read_text())
    for a, b in zip(summary["saes"], ref["saes"]):
        assert a["metrics"]["average_l0"] == pytest.approx(b["metrics"]["average_l0"], rel=1e-5)


@scenario("sharded")
def test_latent_sharded_sae_equals_unsharded(launched):
    from safetensors.torch import load_file

    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.train.recipe import Recipe
    from saescope.train.sae_trainer import SAETrainer

    cfg, full, x = w.shard_problem()
    torch.manual_seed(3)
    fresh = JumpReLUSAE(cfg)
    out = full.loss(x, 0.7)
    out.total.backward()
    ranks = [load_file(str(launched / f"sharded_rank{r}.safetensors")) for r in range(2)]
    assert torch.equal(torch.cat([r["fresh_W_dec"] for r in ranks]), fresh.W_dec.detach())
    assert torch.equal(torch.cat([r["fresh_W_enc"] for r in ranks], dim=1), fresh.W_enc.detach())
    for r in ranks:
        torch.testing.assert_close(r["forward"], full(x).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["x_hat"], out.x_hat_BD, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["loss"][0], out.total.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["l0"][0], out.l0)
        torch.testing.assert_close(r["grad_b_dec"], full.b_dec.grad, rtol=1e-4, atol=1e-5)
    assert full.threshold.grad.abs().sum() > 0  # θ's window holds entries: its gradient is tested
    for name, dim in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0), ("threshold", 0)):
        grad = torch.cat([r[f"grad_{name}"] for r in ranks], dim=dim)
        torch.testing.assert_close(grad, getattr(full, name).grad, rtol=1e-4, atol=1e-5)

    _, sae, x = w.shard_problem()
    trainer = SAETrainer(sae, Recipe.for_steps(w.SHARD_STEPS, lr=1e-2), sparsity_coefficient=0.7, n_steps=w.SHARD_STEPS)
    for step in range(w.SHARD_STEPS):
        trainer.update(step, x, return_metrics=False)
    for name, value in sae.to_arrays().items():
        torch.testing.assert_close(ranks[0][f"trained_{name}"], value, rtol=1e-4, atol=1e-5)


@scenario("latent")
def test_latent_parallel_training_releases_the_unsharded_result(launched, one_thread, tmp_path):
    from saescope.train.trainer import Trainer

    train_and_release(Trainer(w.dp_source(), w.LATENT_SPECS, w.dp_recipe(), tmp_path, **dict(w.TRAIN_KW, n_steps=w.DP_STEPS)))
    want = json.loads((tmp_path / "train_summary.json").read_text())["saes"]
    got = json.loads((launched / "latent/train_summary.json").read_text())["saes"]
    assert [s["sae"] for s in got] == [s["sae"] for s in want]
    for a, b in zip(got, want):
        assert a["metrics"]["average_l0"] == b["metrics"]["average_l0"]
        assert Path(a["folder"]).parent.parent.parent.parent == launched / "latent/release"
        mine, ref = np.load(Path(a["folder"]) / "params.npz"), np.load(Path(b["folder"]) / "params.npz")
        for key in ref.files:  # whole SAEs (gathered from the shards), equal to one device's
            np.testing.assert_allclose(mine[key], ref[key], rtol=1e-5, atol=1e-6)
    shards = [final_state(launched / f"latent/ranks/rank_{r}") for r in range(2)]
    name = w.LATENT_SPECS[0].name
    assert shards[0][name]["sae.W_dec"].shape == (32, 24) == shards[1][name]["sae.W_dec"].shape


@scenario("online")
def test_online_site_parallel_feeds_each_rank_its_sites(launched, one_thread, tmp_path):
    from saescope.train.trainer import Trainer

    model, corpus = build_tiny_model(**w.MODEL), build_tiny_corpus(**w.CORPUS)
    Trainer(w.ConcatSource([w.online_local_source(model, corpus, r, 2) for r in range(2)]), w.ONLINE_SPECS,
            w.RECIPE, tmp_path, **w.TRAIN_KW).fit()
    want = final_state(tmp_path)
    parts = [final_state(launched / f"online/ranks/rank_{r}") for r in range(2)]
    assert parts[0] and parts[1] and not parts[0].keys() & parts[1].keys()
    got = {**parts[0], **parts[1]}
    assert sorted(got) == sorted(want)
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)


@scenario("online_serve")
def test_a_rank_without_saes_serves_exactly_the_batches_the_others_read(launched, one_thread, tmp_path):
    """Rank 1 owns no SAE and the run (2 × 32 rows) is shorter than the scale estimate (320
    tokens): it must make the all-to-alls rank 0's trainer makes (2 for C, 2 for training), no
    more — mirroring the estimate with another formula made it call 10 + 2 and hang the job."""
    from saescope.train.trainer import Trainer

    model, corpus = build_tiny_model(**w.MODEL), build_tiny_corpus(**w.CORPUS)
    kw = dict(w.TRAIN_KW, n_steps=w.SERVE_STEPS)
    Trainer(w.ConcatSource([w.online_local_source(model, corpus, r, 2) for r in range(2)]), w.SERVE_SPECS,
            w.SERVE_RECIPE, tmp_path, **kw).fit()
    want = final_state(tmp_path)
    assert not (launched / "online_serve/ranks/rank_1/checkpoints").exists()  # no SAE there
    got = final_state(launched / "online_serve/ranks/rank_0")
    assert sorted(got) == sorted(want) == [s.name for s in w.SERVE_SPECS]
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)


def test_killed_ranks_fail_clearly_and_relaunches_resume(harvested, resumed):
    """The job fails naming rank 1; the relaunch finishes the harvest, dealing the unwritten shard
    groups out again (equal to one process's store: the harvest test), and resumes training at
    step 4, ending bit-identical to the uninterrupted run."""
    out, (proc, parts, complete) = harvested
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 of 2: injected failure at shard 5" in log, output(proc)  # our message, via torchrun
    assert "rank      : 1" in log  # torchrun's summary names the first rank to fail
    assert parts and not complete  # finished groups wait in per-rank parts

    _, (proc, latest) = resumed
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SIGKILL" in log and "rank      : 1" in log, output(proc)
    assert latest == 4  # checkpoints every 2 steps; rank 1 died at batch 5
    assert store_contents(out / "store_dist")[1:] == store_contents(out / "store")[1:]  # the harvest resumed

    want, got = final_state(out / "dp"), final_state(out / "dp_resumed")
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)


# --- single process ------------------------------------------------------------------------------


def test_assign_specs_balances_flops_and_keeps_sites_whole():
    sites = [Site(layer, "resid_post") for layer in range(6)]
    d_in = {s: 64 for s in sites} | {Site(0, "attn_z"): 128}
    specs = sweep(sites, [1024, 4096], sparsity_coefficients=[1e-3, 3e-3]) + [
        SAESpec(Site(0, "attn_z"), d_sae=16384, sparsity_coefficient=1e-3)]
    ranks = assign_specs(specs, 4, d_in=d_in)
    assert sorted(s.name for r in ranks for s in r) == sorted(s.name for s in specs)
    assert ranks == assign_specs(list(specs), 4, d_in=dict(d_in))  # deterministic
    cost = [sum(d_in[s.site] * s.d_sae for s in r) for r in ranks]
    assert max(cost) == 128 * 16384  # the widest SAE alone; the others share the remaining ranks
    owners = [{s.site for s in r} for r in ranks]
    assert all(not a & b for i, a in enumerate(owners) for b in owners[i + 1 :])  # sites stay whole

    one_site = sweep([Site(3, "mlp_out")], [4096], sparsity_coefficients=[1e-3, 2e-3, 3e-3, 4e-3])
    assert [len(r) for r in assign_specs(one_site, 2, d_in={Site(3, "mlp_out"): 64})] == [2, 2]  # split: 2x faster
    assert [len(r) for r in assign_specs(one_site, 2, d_in={Site(3, "mlp_out"): 64}, split_sites="never")] == [4, 0]
    with pytest.raises(ValueError, match="no input width known for layer_0/attn_z"):
        assign_specs(specs, 2, d_in={s: 64 for s in sites})


def test_single_process_environment_and_clear_launch_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="missing the environment variable.*LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        init_distributed("cpu")
    monkeypatch.setenv(w.FAILURE_VAR_NAME, "rank=1;step=2")
    with pytest.raises(ValueError, match="expected rank=R,step=K"):
        maybe_inject_failure(2)
    monkeypatch.setenv(w.FAILURE_VAR_NAME, "rank=1,step=2")
    maybe_inject_failure(2, env=DistEnv(rank=0, world_size=2))  # another rank: nothing happens
    with pytest.raises(RuntimeError, match="rank 1 of 2: injected failure at batch 2"):
        maybe_inject_failure(2, env=DistEnv(rank=1, world_size=2))


def test_train_command_under_a_torchrun_environment(out, one_thread, tmp_path, monkeypatch):
    """``saescope train`` as torchrun starts it (here a world of one process): site- and
    data-parallel runs release what the plain command releases."""
    from saescope.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train", "--store", str(out / "store"), "--sites", "resid_post@1", "--widths", "32",
              "--tokens", "160", "--batch-size", "32", "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(var, value)
    for mode in ("site", "data"):
        assert main([*common, "--out", str(tmp_path / mode), "--parallel", mode]) == 0
        assert not dist.is_initialized()  # the command leaves the process group
    plain = sorted((tmp_path / "plain/release").rglob("params.npz"))
    assert len(plain) == 1
    for mode in ("site", "data"):
        (got,) = sorted((tmp_path / mode / "release").rglob("params.npz"))
        assert got.relative_to(tmp_path / mode) == plain[0].relative_to(tmp_path / "plain")
        want, have = np.load(plain[0]), np.load(got)
        assert all(np.array_equal(want[k], have[k]) for k in want.files), mode
    assert (tmp_path / "site/parallel.json").exists() and (tmp_path / "site/ranks/rank_0").is_dir()
    assert main([*common, "--out", str(tmp_path / "site"), "--parallel", "data"]) == 1  # refused, named
    assert not dist.is_initialized()


def test_online_site_parallel_refuses_a_second_epoch_and_names_the_flag_that_undoes_it(tmp_path):
    """The default preset gives mlp_out two epochs; under online site parallelism that is refused
    in one line naming --kind-epochs mlp_out=1, and an epoch count of 1 passes this check."""
    from saescope.distributed.modes import train_online_site_parallel
    from saescope.train.recipe import Recipe

    env = DistEnv(rank=0, world_size=2, local_rank=0)
    with pytest.raises(ValueError, match=r"pass --kind-epochs mlp_out=1$"):
        train_online_site_parallel(None, [], Recipe(kind_epochs=("mlp_out=2", "attn_z=1")), tmp_path,
                                   n_steps=4, env=env)
    with pytest.raises(Exception) as err:  # gets past the check, then fails on the missing source
        train_online_site_parallel(None, [], Recipe(kind_epochs=("mlp_out=1",)), tmp_path, n_steps=4, env=env)
    assert "kind_epochs" not in str(err.value)
