"""What each torchrun worker of tests/test_distributed.py runs (not a test module itself).

``python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py SCENARIO OUT``:

One launch per scenario, so that one failure does not take the others down:

* ``harvest OUT``: distributed harvest into OUT/store_dist (launched once with an injected
  failure, then again to resume);
* ``site OUT``: site-parallel training from OUT/store (written by the test beforehand);
* ``dp OUT`` / ``dp_resumed OUT``: data-parallel training, uninterrupted, and killed then resumed;
* ``sharded OUT``: the latent-sharded SAE's forward/loss/gradients and a few trainer steps;
* ``latent OUT``: latent-parallel training;
* ``online OUT``: online site-parallel training;
* ``online_serve OUT``: online site-parallel training where rank 1 has no SAE and the run is
  shorter than the scale estimate (rank 1 must serve exactly the batches rank 0 reads).

The test recomputes each result in one process and compares.  Every shared setting lives here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import build_tiny_corpus, build_tiny_model
from torch.distributed.elastic.multiprocessing.errors import record

from saescope.sites import Site, select_sites
from saescope.distributed.env import FAILURE_VAR as FAILURE_VAR_NAME  # noqa: F401 (used by the test)
from saescope.train.recipe import Recipe
from saescope.train.spec import sweep
from saescope.train.trainer import TrainOptions

# --- shared settings -------------------------------------------------------------------------

MODEL = dict(arch="gemma3", n_layers=3, seed=0)
CORPUS = dict(n_seqs=24, seq_len=16, seed=0)
HARVEST = dict(shard_tokens=40, batch_seqs=3, progress=False)
SITES = select_sites("resid_post,mlp_out@1", 3)
SITE_SPECS = sweep(SITES, [32, 64], sparsity_coefficients=[1e-3])
STEPS = 6
RECIPE = Recipe.for_steps(STEPS, batch_size=32, lr=1e-3, scale_estimate_tokens=64)
TRAIN_KW = dict(n_steps=STEPS, options=TrainOptions(checkpoint_every=2, log_every=2, progress=False), final_steps=2)

DP_SITE = Site(0, "resid_post")
DP_SPECS = sweep([DP_SITE], [64], sparsity_coefficients=[1e-2, 3e-2])
DP_STEPS = 8
DP_BATCH = 32  # global: 2 ranks x 16 rows


def dp_recipe(batch_size: int = DP_BATCH) -> Recipe:
    return Recipe.for_steps(DP_STEPS, batch_size=batch_size, lr=3e-3, scale_estimate_tokens=32)


def dp_source():
    from saescope.activations.source import InMemorySource

    g = torch.Generator().manual_seed(7)
    return InMemorySource({DP_SITE: 2.0 * torch.randn(320, 24, generator=g) + 0.5})


LATENT_SPECS = sweep([DP_SITE], [64], sparsity_coefficients=[1e-2])
SHARD_CFG = dict(d_in=12, d_sae=48, bandwidth=0.3, threshold_init=0.05)


def shard_problem():
    """A JumpReLU SAE with non-trivial biases and thresholds, and a batch: the same everywhere."""
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE

    cfg = SAEConfig(**SHARD_CFG)
    torch.manual_seed(3)
    sae = JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(cfg.d_in, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(cfg.d_sae, generator=g))
        sae.threshold.copy_(0.05 + 0.1 * torch.rand(cfg.d_sae, generator=g))
    x = torch.randn(40, cfg.d_in, generator=g) + 0.2
    return cfg, sae, x


SHARD_STEPS = 4
ONLINE_SITES = select_sites("resid_post@0,resid_post@2,mlp_out@1", 3)
ONLINE_SPECS = sweep(ONLINE_SITES, [32], sparsity_coefficients=[1e-3])
ONLINE = dict(seqs_per_forward=4, buffer_tokens=64)
#: one site: rank 1 owns no SAE; 2 steps of 32 rows, fewer than the 320 tokens of the C estimate
SERVE_SPECS = sweep(ONLINE_SITES[:1], [32], sparsity_coefficients=[1e-3])
SERVE_STEPS = 2
SERVE_RECIPE = Recipe.for_steps(SERVE_STEPS, batch_size=32, lr=1e-3, scale_estimate_tokens=320)


class ConcatSource:
    """The single-process equivalent of the online exchange: step i's batch of every site is the
    concatenation, in rank order, of each rank's own batch i."""

    def __init__(self, locals_):
        self.locals = locals_
        self.sites, self.d_in = locals_[0].sites, locals_[0].d_in

    def iter_batches(self, batch_size, *, seed=0, skip_batches=0):
        n = len(self.locals)
        its = [s.iter_batches(batch_size // n, seed=seed, skip_batches=skip_batches) for s in self.locals]
        for parts in zip(*its):
            yield {site: torch.cat([p[site] for p in parts]) for site in self.sites}


def initial_weights(spec) -> dict[str, torch.Tensor]:
    """The weights the trainer starts ``spec`` from (its seed alone fixes them)."""
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE

    torch.manual_seed(spec.seed)
    return JumpReLUSAE(SAEConfig(d_in=dp_source().d_in[spec.site], d_sae=spec.d_sae)).to_arrays()


def online_local_source(model, corpus, rank, world):
    from saescope.activations.online import OnlineSource
    from saescope.distributed.exchange import corpus_share

    return OnlineSource(model, corpus_share(corpus, rank, world), ONLINE_SITES, **ONLINE)


# --- scenarios ---------------------------------------------------------------------------------


def run_harvest(out: Path, env) -> None:
    from saescope.activations.harvest import HarvestConfig
    from saescope.activations.harvest import harvest as harvest_distributed

    model, corpus = build_tiny_model(**MODEL), build_tiny_corpus(**CORPUS)
    harvest_distributed(model, None, corpus, SITES, out / "store_dist", HarvestConfig(**HARVEST), env=env)


def run_site_parallel(out: Path, env) -> None:
    from saescope.activations.shuffle import default_buffer_tokens
    from saescope.activations.store import ActivationStore, StoreReader
    from saescope.distributed.modes import train_site_parallel

    store = ActivationStore(out / "store")
    buffer = default_buffer_tokens(sum(store.d_in.values()))
    train_site_parallel(lambda sites: StoreReader(store, sites, buffer_tokens=buffer, prefetch=False),
                        SITE_SPECS, RECIPE, out / "site", d_in=store.d_in, env=env, split_sites="never", **TRAIN_KW)


def run_data_parallel(out: Path, env) -> None:
    from saescope.distributed.modes import train_data_parallel

    train_data_parallel(dp_source(), DP_SPECS, dp_recipe(), out, env=env, **dict(TRAIN_KW, n_steps=DP_STEPS))


def run_latent_parallel(out: Path, env) -> None:
    from saescope.distributed.modes import train_latent_parallel

    train_latent_parallel(dp_source(), LATENT_SPECS, dp_recipe(), out, env=env, **dict(TRAIN_KW, n_steps=DP_STEPS))


def run_sharded(out: Path, env) -> None:
    from saescope.sae.sharded import ShardedJumpReLUSAE
    from saescope.train.sae_trainer import SAETrainer

    cfg, full, x = shard_problem()
    torch.manual_seed(3)  # the RNG state `full` was built from: a fresh shard must be its slice
    fresh = ShardedJumpReLUSAE(cfg, rank=env.rank, world_size=env.world_size)
    shard = ShardedJumpReLUSAE.from_full(full, rank=env.rank, world_size=env.world_size)
    out_ = shard.loss(x, 0.7)
    out_.total.backward()
    result = {
        "fresh_W_dec": fresh.W_dec.detach(), "fresh_W_enc": fresh.W_enc.detach(),
        "forward": shard(x).detach(), "x_hat": out_.x_hat_BD, "loss": out_.total.detach().reshape(1),
        "l0": out_.l0.reshape(1),
    }
    shard.reduce_grads()
    result.update({f"grad_{n}": p.grad for n, p in shard.named_parameters()})
    recipe = Recipe.for_steps(SHARD_STEPS, lr=1e-2)
    sharded = ShardedJumpReLUSAE.from_full(full, rank=env.rank, world_size=env.world_size)
    trainer = SAETrainer(sharded, recipe, sparsity_coefficient=0.7, n_steps=SHARD_STEPS,
                         reduce_grads=sharded.reduce_grads)
    for step in range(SHARD_STEPS):
        trainer.update(step, x, return_metrics=False)
    gathered = trainer.sae.gather_full(dst=0)
    if env.is_main:
        result.update({f"trained_{n}": t for n, t in gathered.to_arrays().items()})
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in result.items()}, str(out / f"sharded_rank{env.rank}.safetensors"))


def run_online(out: Path, env, specs=ONLINE_SPECS, recipe=RECIPE, kw=TRAIN_KW, name="online") -> None:
    from saescope.distributed.modes import train_online_site_parallel

    model, corpus = build_tiny_model(**MODEL), build_tiny_corpus(**CORPUS)
    local = online_local_source(model, corpus, env.rank, env.world_size)
    train_online_site_parallel(local, specs, recipe, out / name, env=env, **kw)


SCENARIOS = {
    "harvest": lambda out, env: run_harvest(out, env),
    "site": lambda out, env: run_site_parallel(out, env),
    "dp": lambda out, env: run_data_parallel(out / "dp", env),
    "dp_resumed": lambda out, env: run_data_parallel(out / "dp_resumed", env),
    "sharded": lambda out, env: run_sharded(out, env),
    "latent": lambda out, env: run_latent_parallel(out / "latent", env),
    "online": lambda out, env: run_online(out, env),
    "online_serve": lambda out, env: run_online(out, env, SERVE_SPECS, SERVE_RECIPE,
                                                dict(TRAIN_KW, n_steps=SERVE_STEPS), "online_serve"),
}


@record
def main() -> None:
    from saescope.distributed.env import init_distributed, shutdown

    scenario, out = sys.argv[1], Path(sys.argv[2])
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.set_num_threads(1)
    # a collective that waits longer than this is a hang (a rank making other calls than its peers)
    env = init_distributed("cpu", timeout_s=90)
    SCENARIOS[scenario](out, env)
    (out / f"done_{scenario}_rank{env.rank}.json").write_text(json.dumps({"rank": env.rank, "world": env.world_size}))
    shutdown()


if __name__ == "__main__":
    main()
