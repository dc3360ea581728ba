"""One entry point per way of using W ranks (``docs/distributed.md`` compares them).

* **site parallelism** (:func:`train_site_parallel`): each rank trains its share of the SAEs
  (dealt by FLOPs, :func:`~saescope.distributed.assign.assign_specs`) on its own sites' data, with
  its own checkpoints under ``<out>/ranks/rank_<r>``; no communication while training.  Rank 0
  then gathers every rank's release folders into ``<out>/release`` and writes one summary.
* **data parallelism** (:func:`train_data_parallel`, :class:`~saescope.distributed.plans.DataParallelPlan`).
* **online, site-parallel** (:func:`train_online_site_parallel`): every rank runs the model on
  its own share of the corpus; one all-to-all per step sends each site's rows to its owner.
* **latent parallelism** (:func:`train_latent_parallel`, :class:`~saescope.distributed.plans.LatentParallelPlan`).

A relaunch after a failure resumes.  Site-parallel, online and latent runs must be relaunched with
the same number of processes (``<out>/parallel.json`` records it); a data-parallel run may resume
on any number of ranks that divides the batch, since the global batches do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from saescope.activations.source import BatchSource
from saescope.distributed.assign import assign_specs
from saescope.distributed.env import DistEnv, current
from saescope.distributed.exchange import OwnerExchange
from saescope.distributed.layout import agree_on_start_step, check_layout, check_not_split, finish_split_run, rank_dir
from saescope.distributed.plans import DataParallelPlan, LatentParallelPlan
from saescope.settings import kind_values
from saescope.settings import PAIR_KINDS
from saescope.sites import Site
from saescope.train.recipe import Recipe
from saescope.train.run import train_and_release
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, TrainOptions, planned_reads

MODES = ("site", "data", "latent")


def _main_shows_progress(options: TrainOptions | None, env: DistEnv) -> TrainOptions:
    options = options or TrainOptions()
    return replace(options, progress=options.progress and env.is_main)


def train_site_parallel(make_source: Callable[[list[Site]], BatchSource], specs: list[SAESpec],
                        recipe: Recipe | None, out_dir, *, d_in: dict[Site, int], n_steps: int,
                        env: DistEnv | None = None, split_sites: str = "auto", options: TrainOptions | None = None,
                        **trainer_kw) -> list[Path]:
    """Train this rank's share of ``specs``; return every released folder (on rank 0; [] elsewhere).

    ``make_source(sites)`` opens a source holding only those sites (e.g. a
    :class:`~saescope.activations.store.StoreReader` over them: the rank reads only its sites'
    shards).  For results bit-identical to one process training every spec, the source must give
    the same batches whatever sites it holds (pass the store reader the ``buffer_tokens`` a reader
    of all the sites would use).  ``trainer_kw`` go to each rank's :class:`Trainer`.
    """
    env = env or current()
    out_dir = Path(out_dir)
    assignment = assign_specs(specs, env.world_size, d_in=d_in, split_sites=split_sites)
    check_layout(out_dir, {"mode": "site", "world_size": env.world_size,
                           "ranks": [[s.name for s in group] for group in assignment]}, env)
    mine = assignment[env.rank]
    if mine:
        sites = sorted({s.site for s in mine})
        train_and_release(Trainer(make_source(sites), mine, recipe, rank_dir(out_dir, env.rank), n_steps=n_steps,
                                  options=_main_shows_progress(options, env), **trainer_kw))
    return finish_split_run(out_dir, env)


def train_data_parallel(source: BatchSource, specs: list[SAESpec], recipe: Recipe | None, out_dir, *,
                        n_steps: int, env: DistEnv | None = None, split_batches: bool = True,
                        **trainer_kw) -> list[Path]:
    """Every rank trains every SAE on its slice of each batch (:class:`DataParallelPlan`); rank 0
    writes ``<out>`` as one process would.  Returns the released folders (rank 0; [] elsewhere)."""
    check_not_split(out_dir)
    plan = DataParallelPlan(env, split_batches=split_batches)
    return train_and_release(Trainer(source, specs, recipe, out_dir, n_steps=n_steps, plan=plan, **trainer_kw))


def train_latent_parallel(source: BatchSource, specs: list[SAESpec], recipe: Recipe | None, out_dir, *,
                          n_steps: int, env: DistEnv | None = None, **trainer_kw) -> list[Path]:
    """Train ``specs`` with their latents split over the ranks; every rank reads the same
    ``source``.  Returns the released folders on rank 0 ([] elsewhere)."""
    env = env or current()
    plan = LatentParallelPlan(env)
    plan.check(specs)
    out_dir = Path(out_dir)
    check_layout(out_dir, {"mode": "latent", "world_size": env.world_size, "saes": [s.name for s in specs]}, env)
    folder = rank_dir(out_dir, env.rank)
    agree_on_start_step(folder / "checkpoints", has_state=True, env=env)
    train_and_release(Trainer(source, specs, recipe, folder, n_steps=n_steps, plan=plan, **trainer_kw))
    return finish_split_run(out_dir, env)


def train_online_site_parallel(local: BatchSource, specs: list[SAESpec], recipe: Recipe, out_dir, *,
                               n_steps: int, env: DistEnv | None = None, options: TrainOptions | None = None,
                               data_seed: int = 0, **trainer_kw) -> list[Path]:
    """Online training over W ranks: ``local`` is this rank's own activations of every site of
    ``specs`` (the model on :func:`~saescope.distributed.exchange.corpus_share`); sites are dealt to
    ranks by the FLOPs of their SAEs, each step's rows are exchanged (:class:`OwnerExchange`), each
    rank trains its sites' SAEs.  A rank whose SAEs stop, or that has none, serves the batches the
    trainers read (:func:`~saescope.train.trainer.planned_reads`), so every rank makes the same
    exchanges.  Returns every released folder on rank 0 ([] elsewhere)."""
    env = env or current()
    extra = {k: e for k, e in kind_values(recipe.kind_epochs).items() if e > 1} if recipe is not None else {}
    if extra:  # its ranks serve each other n_steps batches, no more
        undo = ",".join(f"{k}=1" for k in extra)
        raise ValueError("kind_epochs (--kind-epochs) is not supported by online site-parallel training yet; "
                         f"train from a store (--source store), or pass --kind-epochs {undo}")
    out_dir = Path(out_dir)
    assignment = assign_specs(specs, env.world_size, d_in=local.d_in, split_sites="never")
    owners = {s.site: r for r, group in enumerate(assignment) for s in group}
    check_layout(out_dir, {"mode": "online-site", "world_size": env.world_size,
                           "ranks": [[s.name for s in group] for group in assignment]}, env)
    source = OwnerExchange(local, owners, env)
    mine = assignment[env.rank]
    folder = rank_dir(out_dir, env.rank)
    start = agree_on_start_step(folder / "checkpoints", has_state=bool(mine), env=env)
    recipe = recipe if recipe is not None else Recipe.for_steps(n_steps)
    batch = recipe.batch_size
    reads = planned_reads(recipe, n_steps, start)
    if mine:
        train_and_release(Trainer(source, mine, recipe, folder, n_steps=n_steps, data_seed=data_seed,
                                  options=_main_shows_progress(options, env), **trainer_kw))
        reads = [(source.next_batch, n_steps - source.next_batch)]  # what its stopped SAEs did not read
    for first, count in reads:
        source.serve(first, first + count, batch_size=batch, seed=data_seed)
    return finish_split_run(out_dir, env)


def fit_distributed(mode: str, source: BatchSource, specs: list[SAESpec], recipe: Recipe, out_dir, *,
                    n_steps: int, online: bool, env: DistEnv | None = None, **trainer_kw) -> list[Path]:
    """What ``saescope train`` runs under torchrun.  ``mode``: ``"site"``, ``"data"`` or ``"latent"``.

    ``source`` is the :class:`~saescope.activations.store.StoreReader` over the run's sites (from a
    store), or this rank's :class:`~saescope.activations.online.OnlineSource` over its corpus share
    (online).  Site-parallel ranks re-open the store over their own sites with the full reader's
    bucket size, so they see the batches a single process would.  Returns the released folders
    (rank 0).
    """
    env = env or current()
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}: use site, data or latent")
    transcoders = sorted(s.name for s in specs if s.site.kind in PAIR_KINDS)
    if transcoders:
        raise ValueError(f"transcoders train in one process for now ({transcoders[0]}, ...): run saescope train "
                         "without torchrun")
    kw = dict(trainer_kw, n_steps=n_steps, env=env)
    if mode == "latent":
        if online:
            raise ValueError("latent parallelism trains from an activation store (every rank reads the same "
                             "batches): harvest first, or use --parallel site/data online")
        return train_latent_parallel(source, specs, recipe, out_dir, **kw)
    if online:
        if mode == "site":
            return train_online_site_parallel(source, specs, recipe, out_dir, **kw)
        return train_data_parallel(source, specs, recipe, out_dir, split_batches=False, **kw)
    if mode == "site":
        from saescope.activations.store import StoreReader

        store, buffer = source.store, source.buffer_tokens
        return train_site_parallel(lambda sites: StoreReader(store, sites, buffer_tokens=buffer), specs, recipe,
                                   out_dir, d_in=source.d_in, **kw)
    return train_data_parallel(source, specs, recipe, out_dir, **kw)
