"""The trainer: one SAE's step (decoder rule, schedules, metrics), many SAEs per data pass,
bit-identical resume after a kill, NaN isolation, refusal of a changed relaunch."""

import json
import math

import pytest
import torch

from saescope.sae.base import SAE, LossOutput, SAEConfig
from saescope.sites import Site
from saescope.train.checkpoint import CheckpointDir
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import NonFiniteError, SAETrainer
from saescope.activations.source import InMemorySource
from saescope.train.plan import TrainPlan
from saescope.train.run import release_results, train_and_release
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, TrainOptions, estimate_input_scales

RESID, MLP = Site(0, "resid_post"), Site(1, "mlp_out")


class TinySAE(SAE):
    """A ReLU SAE with an L1 penalty and an (unused) threshold: enough to exercise the trainer
    without depending on the real architectures."""

    architecture = "tiny"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), 1e-3))  # threshold_init is JumpReLU's option

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD))

    @torch.no_grad()
    def clamp_threshold_(self, minimum):
        self.threshold.clamp_(min=minimum)

    def loss(self, x_BD, sparsity_coefficient):
        f_BF = self.encode(x_BD)
        x_hat_BD = self.decode(f_BF)
        mse = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        sparsity = sparsity_coefficient * (f_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        active = f_BF > 0
        return LossOutput(
            total=mse + sparsity + 0 * self.threshold.sum(),
            mse=mse.detach(),
            sparsity=sparsity.detach(),
            aux=torch.zeros(()),
            l0=active.float().sum(-1).mean(),
            fired_F=active.sum(0),
            x_hat_BD=x_hat_BD.detach(),
        )


def make_data(n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        RESID: 3.0 * torch.randn(n, d, generator=g) + 1.0,
        MLP: 0.5 * torch.randn(n, d + 4, generator=g),
    }


class KillAt:
    """A source that raises when batch ``kill_step`` is reached (a process killed mid-run)."""

    def __init__(self, source, kill_step):
        self.source, self.kill_step = source, kill_step
        self.sites, self.d_in = source.sites, source.d_in
        self.data_identity = source.data_identity  # the same data as the source it wraps

    def iter_batches(self, batch_size, *, seed=0, skip_batches=0):
        for step, batch in enumerate(self.source.iter_batches(batch_size, seed=seed, skip_batches=skip_batches),
                                     start=skip_batches):
            if step == self.kill_step:
                raise KeyboardInterrupt(f"killed at step {step}")
            yield batch


class PoisonAt:
    """A source whose batch ``step`` for ``site`` holds a NaN."""

    def __init__(self, source, site, step):
        self.source, self.site, self.step = source, site, step
        self.sites, self.d_in = source.sites, source.d_in

    def iter_batches(self, batch_size, *, seed=0, skip_batches=0):
        for step, batch in enumerate(self.source.iter_batches(batch_size, seed=seed, skip_batches=skip_batches),
                                     start=skip_batches):
            if step == self.step:
                batch = dict(batch)
                batch[self.site] = batch[self.site].clone()
                batch[self.site][3, 2] = float("nan")
            yield batch


RECIPE = Recipe(lr=3e-3, lr_warmup_steps=3, sparsity_warmup_steps=5, batch_size=32, scale_estimate_tokens=64)
SPECS = [
    SAESpec(RESID, "tiny", 32, sparsity_coefficient=1e-3),
    SAESpec(RESID, "tiny", 32, sparsity_coefficient=3e-2),
    SAESpec(MLP, "tiny", 24, sparsity_coefficient=1e-2, seed=1),
]


def trainer(source, out, **kw):
    kw = {"n_steps": 12, "checkpoint_every": 4, "log_every": 2, "progress": False,
          "build_sae": TinySAE, "final_steps": 4, **kw}
    options = TrainOptions(**{k: kw.pop(k) for k in ("checkpoint_every", "log_every", "progress", "loggers") if k in kw})
    plan = TrainPlan(build_sae=kw.pop("build_sae"))
    return Trainer(source, kw.pop("specs", SPECS), kw.pop("recipe", RECIPE), out, options=options, plan=plan, **kw)


def sae_trainer(d_in=16, d_sae=32, **kw):
    torch.manual_seed(0)
    sae = TinySAE(SAEConfig(d_in, d_sae, "tiny"))
    kw = {"sparsity_coefficient": 1e-2, "n_steps": 10, "name": "t", "site": RESID, **kw}
    return SAETrainer(sae, kw.pop("recipe", RECIPE), **kw)


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


# --- the real architectures and the release format ------------------------------------------------

REAL_SPECS = [
    SAESpec(RESID, "jumprelu", 64, sparsity_coefficient=1e-3),
    SAESpec(RESID, "jumprelu", 64, sparsity_coefficient=1e-1),
    SAESpec(RESID, "topk", 64, k=4),
    SAESpec(MLP, "batchtopk", 48, k=3, seed=2),
]


def straight_and_resumed(source, tmp_path, kill_step=6, **kw):
    """One run straight through, and one killed at ``kill_step`` then resumed from its checkpoint."""
    reference = trainer(source, tmp_path / "straight", **kw)
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer(KillAt(source, kill_step), tmp_path / "killed", **kw).fit()
    resumed = trainer(source, tmp_path / "killed", **kw)
    resumed.fit()
    return reference, resumed


def test_resume_is_bit_identical_for_every_architecture(tmp_path):
    """Buffers count too: TopK's dead-latent counters and BatchTopK's running threshold."""
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path, specs=REAL_SPECS, build_sae=None)
    for a, b in zip(reference.trainers, resumed.trainers):
        assert a.sae.state_dict().keys() == b.sae.state_dict().keys()
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), f"{a.name}: {key} differs after resume"


def test_release_folders_are_written_and_loadable(tmp_path):
    from saescope.release import load_sae

    data = make_data()
    source = InMemorySource(data)
    run = trainer(source, tmp_path, specs=REAL_SPECS, build_sae=None, model_name="tiny-model")
    folders = train_and_release(run)
    assert len(folders) == len(REAL_SPECS)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    for spec, t, folder in zip(REAL_SPECS, run.trainers, folders):
        metrics = json.loads((folder / "metrics.json").read_text())["training"]
        config = json.loads((folder / "config.json").read_text())
        assert folder.parent == tmp_path / "release" / spec.site.kind / f"layer_{spec.site.layer}" / f"width_{spec.d_sae}"
        assert folder.name.startswith(f"average_l0_{round(metrics['average_l0'])}")
        assert config["model"] == "tiny-model" and config["site"] == spec.site.name
        assert config["tokens_seen"] == 12 * RECIPE.batch_size and config["recipe"]["lr"] == RECIPE.lr
        C = config["input_scale"]
        assert C == pytest.approx(run.scales[spec.site])
        # the released SAE acts on raw activations exactly as the trained one does on x / C
        released = load_sae(folder)
        x = data[spec.site][:32]
        t.sae.eval()
        with torch.no_grad():
            if spec.architecture != "batchtopk":  # BatchTopK's batch-level selection differs at inference
                assert torch.allclose(released.encode(x), C * t.sae.encode(x / C), atol=1e-5)
            assert torch.allclose(released(x), C * t.sae(x / C), atol=1e-4)
    assert [s["status"] for s in summary["saes"]] == ["released"] * len(REAL_SPECS)


class SilentSAE(TinySAE):
    """Never fires: every seed ends at L0 = 0."""

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD)) * 0


def test_same_rounded_l0_gets_distinct_folders(tmp_path):
    specs = [SAESpec(RESID, "tiny", 32, sparsity_coefficient=1e-3, seed=s) for s in (0, 1)]
    folders = train_and_release(trainer(InMemorySource(make_data()), tmp_path, specs=specs, build_sae=SilentSAE))
    assert [f.name for f in folders] == ["average_l0_0", "average_l0_0_2"]
    assert all((f / "params.npz").exists() for f in folders)


def test_cli_trains_from_a_store_and_resumes(tmp_path, capsys):
    """`saescope train --store RUN/store` end to end on a tiny model: a λ sweep at two widths,
    released in Gemma Scope's layout under RUN/release; the same command again resumes (no-op)."""
    from conftest import build_tiny_corpus, build_tiny_model

    from saescope.cli import main
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.release import load_sae

    sites = [Site(1, "resid_post"), Site(1, "mlp_out")]
    harvest(build_tiny_model("gemma3", n_layers=2), None, build_tiny_corpus(n_seqs=16, seq_len=16), sites,
            tmp_path / "store", HarvestConfig(model_name="tiny-gemma3", progress=False, shard_tokens=64))
    argv = ["train", "--store", str(tmp_path / "store"), "--sites", "resid_post", "--widths", "64,96",
            "--l0-coefficients", "1e-3,1e-2", "--batch-size", "32", "--checkpoint-every", "2", "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    released = sorted((tmp_path / "release" / "resid_post" / "layer_1").glob("width_*/average_l0_*"))
    assert len(released) == 4 and {p.parent.name for p in released} == {"width_64", "width_96"}
    for folder in released:
        config = json.loads((folder / "config.json").read_text())
        assert config["model"] == "tiny-gemma3" and config["site"] == "layer_1/resid_post"
        assert load_sae(folder).cfg.d_sae == config["d_sae"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["tokens"] == summary["n_steps"] * 32 and len(summary["saes"]) == 4
    before = {p: (p / "params.npz").read_bytes() for p in released}
    capsys.readouterr()
    assert main(argv) == 0  # relaunch: the run is complete, the same SAEs are released again
    assert {p: (p / "params.npz").read_bytes() for p in released} == before
    assert main(argv[:-2] + ["--device", "cpu", "--lr", "1e-3"]) == 1
    assert "recipe.lr" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["centred", "diagonal"])
def test_non_scalar_input_map_resumes_bit_identically_and_releases_exactly(tmp_path, mode):
    """A run behind a per-dimension map resumes bit for bit (the map is in the checkpoint), and
    its released SAEs act on raw activations as the trained ones do behind the map."""
    from saescope.release import load_sae

    data = make_data()
    source = InMemorySource(data)
    recipe = RECIPE.replace(input_norm=mode, input_norm_power=0.5)
    kw = {"specs": REAL_SPECS, "build_sae": None, "recipe": recipe}
    reference = trainer(source, tmp_path / "straight", **kw)
    folders = train_and_release(reference)
    with pytest.raises(KeyboardInterrupt):
        trainer(KillAt(source, 6), tmp_path / "killed", **kw).fit()
    resumed = trainer(source, tmp_path / "killed", **kw)
    assert [f.relative_to(tmp_path / "killed") for f in train_and_release(resumed)] == \
        [f.relative_to(tmp_path / "straight") for f in folders]
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), f"{a.name}: {key} differs after resume"
    for spec, t, folder in zip(REAL_SPECS, reference.trainers, folders):
        config = json.loads((folder / "config.json").read_text())
        assert config["input_norm"] == mode and config["input_scale"] is None
        norm = reference.norms[spec.site]
        released = load_sae(folder)
        x = data[spec.site][:32]
        t.sae.eval()
        with torch.no_grad():
            expected = t.sae(norm.apply(x)) / norm.gain_D + norm.shift_D
            assert torch.allclose(released(x), expected, rtol=1e-4, atol=1e-4)
            if released.architecture == "jumprelu":  # unit-norm decoder rows in raw units
                assert torch.allclose(released.W_dec.norm(dim=1), torch.ones(spec.d_sae), atol=1e-5)


# --- steps per batch by site kind (Recipe.kind_splits) -----------------------------------------


class Recording:
    """A source that keeps every batch each pass over it yields."""

    def __init__(self, source):
        self.source, self.sites, self.d_in = source, source.sites, source.d_in
        self.data_identity = source.data_identity
        self.passes: list[list[dict]] = []

    def iter_batches(self, batch_size, *, seed=0, skip_batches=0):
        self.passes.append([])
        for batch in self.source.iter_batches(batch_size, seed=seed, skip_batches=skip_batches):
            self.passes[-1].append(batch)
            yield batch


def test_recipe_split_keeps_warmups_in_tokens_and_refuses_bad_splits():
    recipe = RECIPE.replace(kind_splits=("mlp_out=2",), sparsity_warmup_steps=5)
    assert (recipe.splits_at("mlp_out"), recipe.splits_at("resid_post")) == (2, 1)
    half = recipe.split(2)
    assert (half.batch_size, half.lr_warmup_steps, half.sparsity_warmup_steps, half.kind_splits) == (16, 6, 10, ())
    assert recipe.split(1) is recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # a checkpoint's round trip
    with pytest.raises(ValueError, match="mlp_out=3 does not divide the batch of 32"):
        RECIPE.replace(kind_splits=("mlp_out=3",))
    with pytest.raises(ValueError, match="kind_splits: .*noise=2"):
        RECIPE.replace(kind_splits=("noise=2",))
    with pytest.raises(ValueError, match="kind_splits: mlp_out=16 does not divide the 8 rows"):
        Trainer(InMemorySource(make_data()), SPECS, RECIPE.replace(kind_splits=("mlp_out=16",)), "unused",
                n_steps=4, plan=TrainPlan(build_sae=TinySAE, rows_divisor=4))  # a data-parallel rank's 8 rows


def _mlp_only_differs(tmp_path, **recipe_changes):
    """A run with ``recipe_changes`` (recorded source) and one without: the resid_post SAEs must be
    bit-identical, the mlp_out one must differ.  Returns the recording and the changed run."""
    source = Recording(InMemorySource(make_data()))
    changed = trainer(source, tmp_path / "changed", recipe=RECIPE.replace(**recipe_changes))
    changed.fit()
    plain = trainer(InMemorySource(make_data()), tmp_path / "plain")
    plain.fit()
    for a, b in zip(changed.trainers, plain.trainers):
        same = all(torch.equal(p, q) for p, q in zip(a.sae.parameters(), b.sae.parameters()))
        assert same == (a.site == RESID), a.name
    return source, changed


def test_a_split_kind_takes_one_step_per_part_of_each_batch(tmp_path):
    """mlp_out=2: its SAE is exactly an SAETrainer stepped on each batch's two halves; the other
    kind's SAEs are those of a run without the split."""
    source, split = _mlp_only_differs(tmp_path, kind_splits=("mlp_out=2",))
    t = next(t for t in split.trainers if t.site == MLP)
    assert t.n_steps == 24 and t.tokens_seen == 12 * 32
    torch.manual_seed(1)  # the spec's seed
    manual = SAETrainer(TinySAE(SAEConfig(20, 24, "tiny")), RECIPE.split(2), sparsity_coefficient=1e-2, n_steps=24,
                        input_scale=t.input_scale, name="manual", site=MLP, final_steps=4)
    for step, batch in enumerate(source.passes[-1]):
        for j, half in enumerate(batch[MLP].chunk(2)):
            manual.update(2 * step + j, half, return_metrics=False)
    for (name, p), q in zip(t.sae.named_parameters(), manual.sae.parameters()):
        assert torch.equal(p, q), name


def test_a_kind_with_two_epochs_trains_on_after_the_others_stop(tmp_path):
    """kind_epochs mlp_out=2: its SAE is exactly an SAETrainer stepped on the source's first
    2·n_steps batches (its schedule spans them all); the other kind's SAEs are those of a run
    without it, and their log ends at n_steps."""
    source, run = _mlp_only_differs(tmp_path, kind_epochs=("mlp_out=2",))
    assert len(source.passes[-1]) == 24  # 16 batches an epoch: the run read into the second
    t = next(t for t in run.trainers if t.site == MLP)
    assert t.n_steps == 24 and t.tokens_seen == 24 * 32
    torch.manual_seed(1)  # the spec's seed
    manual = SAETrainer(TinySAE(SAEConfig(20, 24, "tiny")), RECIPE, sparsity_coefficient=1e-2, n_steps=24,
                        input_scale=t.input_scale, name="manual", site=MLP, final_steps=4)
    for step, batch in enumerate(source.passes[-1]):
        manual.update(step, batch[MLP], return_metrics=False)
    for (name, p), q in zip(t.sae.named_parameters(), manual.sae.parameters()):
        assert torch.equal(p, q), name
    lines = [json.loads(x) for x in (tmp_path / "changed" / "train_log.jsonl").read_text().splitlines()]
    last = {}
    for line in lines:
        if "sae" in line and "loss" in line:
            last[line["site"]] = max(last.get(line["site"], 0), line["step"])
    assert last == {str(RESID): 12, str(MLP): 24}
    assert Recipe.from_dict(json.loads(json.dumps(run.recipe.to_dict()))) == run.recipe  # a checkpoint's round trip
    with pytest.raises(ValueError, match="kind_epochs: .*noise=2"):
        RECIPE.replace(kind_epochs=("noise=2",))


def test_a_run_with_more_epochs_at_one_kind_resumes_bit_identically(tmp_path):
    """Killed in the second epoch (only mlp_out's SAE still training), resumed: bit-identical."""
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path, kill_step=18,
                                              recipe=RECIPE.replace(kind_epochs=("mlp_out=2",)))
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), f"{a.name}: {key} differs after resume"


def test_a_split_run_resumes_bit_identically(tmp_path):
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path,
                                              recipe=RECIPE.replace(kind_splits=("mlp_out=2", "resid_post=4")))
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), f"{a.name}: {key} differs after resume"
