"""The trainer, one SAE and many: the step (decoder rule, schedules, metrics), bit-identical
resume after a kill, NaN isolation, refusal of a changed relaunch, the CLI's refusals."""

import json
import math

import pytest
import torch

from saescope.activations.source import InMemorySource
from saescope.train.checkpoint import CheckpointDir
from saescope.train.sae_trainer import NonFiniteError
from saescope.train.run import release_results
from saescope.train.spec import SAESpec
from saescope.train.trainer import estimate_input_scales

from trainer_kit import MLP, RECIPE, RESID, SPECS, KillAt, PoisonAt, make_data, sae_trainer, trainer


# --- one SAE -----------------------------------------------------------------------------------


def test_decoder_rows_stay_unit_norm_and_threshold_positive():
    t = sae_trainer()
    x = make_data()[RESID][:32]
    with torch.no_grad():
        t.sae.threshold.fill_(-1.0)
    for step in range(5):
        t.update(step, x)
        norms = t.sae.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert (t.sae.threshold >= RECIPE.threshold_min).all()
    # the rule can be switched off: rows then drift from unit norm under Adam at this lr
    loose = sae_trainer(recipe=RECIPE.replace(decoder_unit_norm=False))
    for step in range(5):
        loose.update(step, x)
    assert not torch.allclose(loose.sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-3)


def test_update_uses_the_schedules_and_scale():
    t = sae_trainer(input_scale=2.0, n_steps=10)
    x = make_data()[RESID][:32]
    for step in range(4):
        metrics = t.update(step, x)
        assert metrics["lr"] == RECIPE.lr_at(step)
        assert t.optimizer.param_groups[0]["lr"] == RECIPE.lr_at(step)
        assert metrics["sparsity_coefficient"] == pytest.approx(1e-2 * RECIPE.sparsity_factor_at(step))
    assert metrics["sparsity_coefficient"] == pytest.approx(1e-2 * 3 / 5)


def test_fvu_is_about_the_batch_mean_and_dead_latents_are_counted():
    t = sae_trainer(d_in=16, d_sae=8)
    x = make_data()[RESID][:32]  # mean ≈ 1 per coordinate: FVU about zero would be well below 1
    with torch.no_grad():
        t.sae.W_enc.zero_()
        t.sae.b_dec.copy_(x.mean(0))
    metrics = t.update(0, x)  # nothing fires: the reconstruction is b_dec, the batch mean
    assert metrics["fvu"] == pytest.approx(1.0, rel=1e-6)
    assert metrics["l0"] == 0
    assert metrics["dead_fraction"] == 1.0
    # one counter, the SAE's: it is what the metric reads and what a checkpoint holds
    assert not hasattr(t, "tokens_since_fired_F") and (t.sae.tokens_since_fired_F == 32).all()
    assert "tokens_since_fired_F" not in t.state_tensors() and "sae.tokens_since_fired_F" in t.state_tensors()


def _fisher_like_norm(x_ND: torch.Tensor, seed: int = 0):
    """A full (non-diagonal) input map, as the Fisher map is: its metric a random SPD matrix."""
    from saescope.sae.input_norm import InputNorm

    g = torch.Generator().manual_seed(seed)
    D = x_ND.shape[1]
    A_DD = torch.randn(D, D, generator=g)
    x64 = x_ND.double()
    return InputNorm.from_fisher(len(x_ND), x64.sum(0), x64.square().sum(0), torch.cov(x64.T),
                                 A_DD @ A_DD.T / D + torch.eye(D), power=0.5, weight=0.5)


@pytest.mark.parametrize("B", [64, 1024])
def test_training_fvu_under_a_full_map_is_measured_on_evenly_spaced_rows(B):
    """A full map's FVU is taken in raw units on ~METRIC_ROWS evenly spaced rows (all of a small
    batch): the figure equals the one computed by hand on those rows, and mse_raw divides by them."""
    from saescope.train.sae_trainer import METRIC_ROWS

    x = torch.randn(B, 16, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 3, 16) + 1
    norm = _fisher_like_norm(x)
    t = sae_trainer(input_norm=norm)
    state = {n: p.detach().clone() for n, p in t.sae.named_parameters()}
    metrics = t.update(0, x)
    # the same step's reconstruction, by hand, from the weights before the step
    with torch.no_grad():
        for n, p in t.sae.named_parameters():
            p.copy_(state[n])
        x_n = norm.apply(x)
        if RECIPE.b_dec_init == "mean":
            t.sae.b_dec.copy_(x_n.mean(0))
        err = norm.to_raw(x_n - t.sae(x_n))
    stride = max(1, B // METRIC_ROWS)
    rows = slice(None, None, stride)
    dev = x - x.mean(0)
    assert (B > METRIC_ROWS) == (stride > 1)
    assert metrics["fvu"] == pytest.approx(float(err[rows].square().sum() / dev[rows].square().sum()), rel=1e-4)
    assert metrics["mse_raw"] == pytest.approx(float(err[rows].square().sum(1).mean()), rel=1e-4)


def test_the_finiteness_probe_is_exact():
    """A gradient whose float32 sum overflows is still finite (no error); a NaN in one is named."""
    t = sae_trainer()
    x = make_data()[RESID][:32]
    t.update(0, x)
    total = torch.tensor(1.0)
    for p in t.sae.parameters():
        p.grad = torch.zeros_like(p)
    t.sae.W_enc.grad.fill_(3e38)  # every element finite, their sum not
    t._check_finite(1, (x,), total)
    t.sae.W_dec.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite gradient in W_dec"):
        t._check_finite(1, (x,), total)


def test_non_finite_batch_stops_the_sae_without_touching_weights():
    t = sae_trainer()
    x = make_data()[RESID][:32].clone()
    t.update(0, x)
    before = {n: p.detach().clone() for n, p in t.sae.named_parameters()}
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 1 on site layer_0/resid_post: .*1 Inf"):
        t.update(1, x)
    for n, p in t.sae.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="already stopped"):
        t.update(2, x)


def test_input_scale_makes_mean_squared_norm_one():
    source = InMemorySource(make_data())
    scales = estimate_input_scales(source, [RESID, MLP], batch_size=64, n_tokens=512)
    data = make_data()
    for site in (RESID, MLP):
        assert (data[site] / scales[site]).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_resume_after_kill_is_bit_identical(tmp_path):
    source = InMemorySource(make_data())
    reference = trainer(source, tmp_path / "straight")
    reference.fit()

    with pytest.raises(KeyboardInterrupt):
        trainer(KillAt(source, 10), tmp_path / "killed").fit()  # last checkpoint: step 8
    assert CheckpointDir(tmp_path / "killed" / "checkpoints").latest()[0] == 8
    resumed = trainer(source, tmp_path / "killed")
    resumed.fit()

    for a, b in zip(reference.trainers, resumed.trainers):
        for (name, p), q in zip(a.sae.named_parameters(), b.sae.parameters()):
            assert torch.equal(p, q), f"{a.name}.{name} differs after resume"
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), key
    # the log reads as one run: each (step, SAE) once
    records = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["sae"]) for r in records if "l0" in r]
    assert len(keys) == len(set(keys)) == 6 * len(SPECS)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from saescope.train import checkpoint

    source = InMemorySource(make_data())
    real_save, calls = checkpoint.save_file, []

    def dying_save(tensors, path):
        calls.append(path)
        if len(calls) == len(SPECS) + 2:  # midway through the second checkpoint
            raise KeyboardInterrupt("killed while writing")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer(source, tmp_path / "run").fit()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert CheckpointDir(tmp_path / "run" / "checkpoints").latest()[0] == 4
    resumed = trainer(source, tmp_path / "run")
    resumed.fit()
    reference = trainer(source, tmp_path / "straight")
    reference.fit()
    for a, b in zip(reference.trainers, resumed.trainers):
        assert all(torch.equal(p, q) for p, q in zip(a.sae.parameters(), b.sae.parameters()))
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_*"))  # partial folder cleaned


def test_nan_in_one_site_stops_only_its_saes(tmp_path):
    source = PoisonAt(InMemorySource(make_data()), MLP, step=6)
    run = trainer(source, tmp_path / "run")
    release_results(run, run.fit(), folders=False)
    stopped = [t for t in run.trainers if t.error]
    assert [t.site for t in stopped] == [MLP]
    assert "step 6" in stopped[0].error and "layer_1/mlp_out" in stopped[0].error and "NaN" in stopped[0].error
    for t in run.trainers:
        assert all(torch.isfinite(p).all() for p in t.sae.parameters())
        assert t.tokens_seen == (6 if t.site == MLP else 12) * RECIPE.batch_size
    # the error is in the log and the summary; the checkpoint holds finite weights
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert '"event": "error"' in log and "layer_1/mlp_out" in log
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    status = {s["sae"]: s["status"] for s in summary["saes"]}
    assert status[stopped[0].name] == "stopped" and sum(v == "trained" for v in status.values()) == 2
    _, tensors = CheckpointDir(tmp_path / "run" / "checkpoints").load(tmp_path / "run" / "checkpoints" / "step_000000012")
    assert all(torch.isfinite(v).all() for named in tensors.values() for v in named.values())


def test_non_finite_scale_estimate_stops_the_site_before_step_0(tmp_path):
    source = PoisonAt(InMemorySource(make_data()), MLP, step=0)  # the estimate reads batch 0
    run = trainer(source, tmp_path)
    run.fit()
    errors = {t.site: t.error for t in run.trainers}
    assert errors[RESID] is None
    assert "before step 0" in errors[MLP] and "input scale" in errors[MLP]
    assert all(t.tokens_seen == 0 for t in run.trainers if t.site == MLP)


def test_in_memory_source_is_deterministic_and_skips_exactly():
    source = InMemorySource(make_data(n=100))
    straight = [b for _, b in zip(range(9), source.iter_batches(32, seed=3))]  # 3 per epoch: crosses epochs
    for k in (0, 2, 3, 7):
        skipped = next(source.iter_batches(32, seed=3, skip_batches=k))
        assert all(torch.equal(skipped[s], straight[k][s]) for s in source.sites)
    other = next(source.iter_batches(32, seed=4))
    assert not torch.equal(other[RESID], straight[0][RESID])
    # one permutation serves every site: row i of each site is the same token
    data = make_data(n=100)
    row = straight[4][RESID][0]
    index = int((data[RESID] == row).all(dim=1).nonzero())
    assert torch.equal(straight[4][MLP][0], data[MLP][index])


def test_optional_loggers_must_be_installed(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="tensorboard.*not installed"):
        trainer(InMemorySource(make_data()), tmp_path, loggers=("tensorboard",))  # refused before any work
    with pytest.raises(ValueError, match="unknown logger"):
        trainer(InMemorySource(make_data()), tmp_path, loggers=("mlflow",))
    assert not tmp_path.joinpath("checkpoints").exists()


def test_relaunch_with_a_different_run_is_refused(tmp_path):
    source = InMemorySource(make_data())
    trainer(source, tmp_path / "run", n_steps=4).fit()
    with pytest.raises(ValueError, match=r"recipe\.lr: 0\.003 -> 0\.001"):
        trainer(source, tmp_path / "run", n_steps=4, recipe=RECIPE.replace(lr=1e-3)).fit()
    extra = SAESpec(MLP, "tiny", 48, sparsity_coefficient=1e-2)
    with pytest.raises(ValueError, match=r"saes\.layer_1\.mlp_out\.tiny\.48\.lambda0\.01\.seed0 is new"):
        trainer(source, tmp_path / "run", n_steps=4, specs=SPECS + [extra]).fit()
    with pytest.raises(ValueError, match=r"n_steps: 4 -> 5"):
        trainer(source, tmp_path / "run", n_steps=5).fit()
    trainer(source, tmp_path / "run", n_steps=4, log_every=1).fit()  # bookkeeping may change


def test_bad_inputs_are_named(tmp_path):
    source = InMemorySource({RESID: make_data()[RESID]})
    with pytest.raises(ValueError, match="no activations for layer_1/mlp_out"):
        trainer(source, tmp_path)
    with pytest.raises(ValueError, match="duplicate"):
        trainer(source, tmp_path, specs=[SPECS[0], SPECS[0]])
    with pytest.raises(ValueError, match="exactly one"):
        trainer(source, tmp_path, specs=SPECS[:1], total_tokens=1000)
    assert trainer(source, tmp_path, specs=SPECS[:1], n_steps=None, total_tokens=1000).n_steps == math.ceil(1000 / 32)


def test_bfloat16_autocast_keeps_fp32_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_CPU_BF16", "1")  # bf16 even on a CPU without bf16 units
    source = InMemorySource(make_data())
    run = trainer(source, tmp_path, n_steps=3, recipe=RECIPE.replace(dtype="bfloat16"))
    run.fit()
    for t in run.trainers:
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in t.sae.parameters())
        assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for k, v in s.items() if k != "step")


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_refuses_unclear_requests(tmp_path, capsys):
    from saescope.cli import main

    assert main(["train", "--out", str(tmp_path)]) == 1
    assert "either --store" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "none"), "--arch", "topk"]) == 1
    assert "needs --k" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "none"), "--k", "32"]) == 1
    assert "not --k" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "none")]) == 1
    assert "no activation store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--store", str(tmp_path), "--widths", "4k,lots"])
