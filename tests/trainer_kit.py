"""What the trainer tests share: a tiny SAE, toy data, sources that die or poison a batch,
a small recipe and plan, and a run done twice (straight, and killed then resumed)."""

import pytest
import torch

from saescope.sae.base import SAE, LossOutput, SAEConfig
from saescope.sites import Site
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer
from saescope.train.plan import TrainPlan
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, TrainOptions

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
