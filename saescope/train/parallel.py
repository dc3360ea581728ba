"""Distributed training over the unchanged :class:`~saescope.train.trainer.Trainer`.

Four ways to use W ranks (``docs/distributed.md`` compares them):

* **site parallelism** (:func:`train_site_parallel`): each rank trains its share of the SAEs
  (dealt by FLOPs, :func:`~saescope.train.distributed.assign_specs`) on its own sites' data, with
  its own checkpoints under ``<out>/ranks/rank_<r>``; no communication while training.  Rank 0
  then gathers every rank's release folders into ``<out>/release`` and writes one summary.
* **data parallelism** (:class:`DataParallelTrainer`): every rank holds every SAE, trains on its
  slice of each global batch and averages gradients; rank 0 alone writes checkpoints, log and
  release, into ``<out>`` exactly as a single process would.
* **online, site-parallel** (:mod:`saescope.train.online_parallel`): every rank runs the model
  on its own share of the corpus, and one all-to-all per step sends each site's rows to the rank
  that owns the site;
* **latent parallelism** (:mod:`saescope.train.latent_parallel`): SAEs too wide for one device,
  their latents split over the ranks.

A relaunch after a failure resumes.  Site-parallel and online runs must be relaunched with the
same number of processes (``<out>/parallel.json`` records it); a data-parallel run may resume
on any number of ranks that divides the batch, since the global batches do not depend on it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from saescope.batches import BatchSource
from saescope.sites import Site
from saescope.train.checkpoint import CheckpointDir, write_json_atomic
from saescope.train.distributed import (
    DistEnv,
    GradAllReduce,
    all_reduce_,
    assign_specs,
    barrier,
    current,
    maybe_inject_failure,
)
from saescope.train.recipe import Recipe
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, estimate_input_scales


def rank_dir(out_dir: Path, rank: int) -> Path:
    """Where one rank of a site-parallel or online run keeps its checkpoints and log."""
    return Path(out_dir) / "ranks" / f"rank_{rank}"


class NullLog:
    """The metrics log of ranks that do not write one."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


# --- data parallelism --------------------------------------------------------------------------


class RankSlice:
    """This rank's rows of every global batch of a source that all ranks read identically.

    Batch ``i`` of size B from ``source`` is cut into W consecutive slices of B/W rows; rank r
    gets slice r.  The W slices of a step are thus exactly the single-process batch, whatever W.
    """

    def __init__(self, source: BatchSource, env: DistEnv):
        self.source, self.env = source, env
        self.sites, self.d_in = source.sites, source.d_in
        self.model_name = getattr(source, "model_name", None)

    def iter_batches(self, batch_size: int, *, seed: int = 0, skip_batches: int = 0):
        W, r = self.env.world_size, self.env.rank
        if batch_size % W:
            raise ValueError(f"batch size {batch_size} is not divisible by the {W} data-parallel ranks")
        b = batch_size // W
        batches = self.source.iter_batches(batch_size, seed=seed, skip_batches=skip_batches)
        for i, batch in enumerate(batches, start=skip_batches):
            maybe_inject_failure(i, "batch", self.env)
            yield {site: x[r * b : (r + 1) * b] for site, x in batch.items()}


class LocalShare:
    """A rank's *own* source (e.g. the model run on its share of the corpus), asked for B/W rows."""

    def __init__(self, source: BatchSource, env: DistEnv):
        self.source, self.env = source, env
        self.sites, self.d_in = source.sites, source.d_in
        self.model_name = getattr(source, "model_name", None)

    def iter_batches(self, batch_size: int, *, seed: int = 0, skip_batches: int = 0):
        if batch_size % self.env.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.env.world_size} ranks")
        batches = self.source.iter_batches(batch_size // self.env.world_size, seed=seed, skip_batches=skip_batches)
        for i, batch in enumerate(batches, start=skip_batches):
            maybe_inject_failure(i, "batch", self.env)
            yield batch


class DataParallelTrainer(Trainer):
    """:class:`Trainer` with every SAE replicated on every rank and gradients averaged.

    ``source``: with ``split_batches=True`` (default) a source every rank reads identically (an
    activation store); each rank trains on its slice of each global batch, so the result equals
    one process with the global batch ``recipe.batch_size`` up to float rounding.  With
    ``split_batches=False`` each rank's ``source`` is its own data (online, the model on its share
    of the corpus) and yields B/W rows per step.  Other arguments as :class:`Trainer`.

    Only rank 0 writes (checkpoints, log, release); every rank resumes from rank 0's checkpoint,
    which holds the state of all of them (it is the same on every rank).  The logged metrics are
    rank 0's share of each batch; the released metrics and token counts cover every rank.
    """

    def __init__(self, source: BatchSource, specs: list[SAESpec], recipe: Recipe | None, out_dir,
                 *, env: DistEnv | None = None, split_batches: bool = True, **kwargs):
        if "reduce_grads" in kwargs:
            raise TypeError("DataParallelTrainer sets reduce_grads itself (the gradient all-reduce)")
        self.env = env or current()
        check_not_split(out_dir)
        self.split_batches = split_batches
        self.grad_reduce = GradAllReduce(self.env)
        local = RankSlice(source, self.env) if split_batches else LocalShare(source, self.env)
        kwargs["progress"] = kwargs.get("progress", True) and self.env.is_main
        kwargs.setdefault("model_name", getattr(source, "model_name", None))
        super().__init__(local, specs, recipe, out_dir, reduce_grads=self.grad_reduce, **kwargs)
        W = self.env.world_size
        if self.recipe.batch_size % W:
            raise ValueError(f"batch size {self.recipe.batch_size} is not divisible by the {W} data-parallel ranks")
        self.rows_per_step = self.recipe.batch_size // W

    def run_identity(self) -> dict:
        run = super().run_identity()
        if not self.split_batches:  # each rank's own data: the stream depends on the rank count
            run["data_parallel_ranks"] = self.env.world_size
        return run

    def _estimate_scales(self) -> dict[Site, float]:
        reduce = lambda sums: all_reduce_(sums, "sum", what="summing the input-scale estimate")
        return estimate_input_scales(self.source, self.sites, batch_size=self.recipe.batch_size,
                                     n_tokens=self.scale_estimate_tokens, seed=self.data_seed,
                                     reduce_sums=reduce)

    def _open_log(self, start: int):
        return super()._open_log(start) if self.env.is_main else NullLog()

    def save_checkpoint(self, step: int, ckpt: CheckpointDir):
        return super().save_checkpoint(step, ckpt) if self.env.is_main else None

    def _release(self) -> list[Path]:
        """Average the release metrics over the ranks, then rank 0 releases."""
        W = self.env.world_size
        for t in self.trainers:
            all_reduce_(t.final_sums, "sum", what=f"summing {t.name}'s final metrics").div_(W)
            seen = torch.tensor([t.tokens_seen], dtype=torch.int64)
            t.tokens_seen = int(all_reduce_(seen, "sum", what="summing tokens seen"))
            # local rows since a latent last fired on this rank; fired anywhere = min over ranks
            all_reduce_(t.tokens_since_fired_F, "min", what=f"merging {t.name}'s latent firing").mul_(W)
        return super()._release() if self.env.is_main else []


# --- site parallelism ---------------------------------------------------------------------------


def check_not_split(out_dir) -> None:
    """Refuse to run a single-process or data-parallel training in the folder of a site-parallel
    or online run (whose state lives under ``ranks/``): it would silently start over."""
    path = Path(out_dir) / "parallel.json"
    if path.exists():
        layout = json.loads(path.read_text())
        raise ValueError(
            f"{out_dir} holds a {layout.get('mode')}-parallel run over {layout.get('world_size')} ranks: relaunch it "
            f"with torchrun ({layout.get('world_size')} processes in total) and the same arguments, or use another "
            "output folder"
        )


def check_layout(out_dir: Path, layout: dict, env: DistEnv) -> None:
    """Record how a run is split over ranks (``parallel.json``); refuse a relaunch split otherwise."""
    if (Path(out_dir) / "checkpoints" / "run.json").exists():
        raise ValueError(f"{out_dir} holds a single-process or data-parallel run; relaunch it the way it was "
                         "started (e.g. --parallel data), or use another output folder")
    path = Path(out_dir) / "parallel.json"
    if env.is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, layout)
    barrier("recording the run's layout")
    previous = json.loads(path.read_text())
    if previous != json.loads(json.dumps(layout)):
        raise ValueError(
            f"{out_dir} holds a {previous.get('mode')}-parallel run over {previous.get('world_size')} ranks "
            f"with another split of the SAEs; relaunch it with {previous.get('world_size')} processes in total "
            f"and the same SAEs, or use another output folder (this launch: {layout['mode']}, "
            f"{layout['world_size']} ranks)"
        )


def merge_rank_runs(out_dir: Path, world_size: int) -> list[Path]:
    """Rank 0, after every rank finished: move each rank's release folders into ``<out>/release``
    (a name taken by another rank gets a ``_2``, ``_3`` ... suffix, as within one trainer) and
    write ``<out>/train_summary.json`` listing every SAE with the rank that trained it."""
    out_dir = Path(out_dir)
    release, used, folders, saes, header = out_dir / "release", set(), [], [], {}
    for r in range(world_size):
        src_root = rank_dir(out_dir, r)
        path = src_root / "train_summary.json"
        if not path.exists():
            continue  # a rank with nothing to train
        summary = json.loads(path.read_text())
        header = {k: v for k, v in summary.items() if k != "saes"}
        for entry in summary["saes"]:
            entry = {**entry, "rank": r}
            if entry["status"] == "released":
                src = Path(entry["folder"])
                base = release / src.relative_to(src_root / "release")
                dst, n = base, 2
                while dst in used:
                    dst, n = base.with_name(f"{base.name}_{n}"), n + 1
                used.add(dst)
                if src.exists():  # absent when an earlier merge of this run already moved it
                    if dst.exists():
                        shutil.rmtree(dst)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                entry["folder"] = str(dst)
                folders.append(dst)
            saes.append(entry)
        shutil.rmtree(src_root / "release", ignore_errors=True)  # emptied folders (and stale temporaries)
    write_json_atomic(out_dir / "train_summary.json", {**header, "world_size": world_size, "saes": saes})
    return folders


def train_site_parallel(make_source: Callable[[list[Site]], BatchSource], specs: list[SAESpec],
                        recipe: Recipe | None, out_dir, *, d_in: dict[Site, int], env: DistEnv | None = None,
                        split_sites: str = "auto", **trainer_kwargs) -> list[Path]:
    """Train this rank's share of ``specs``; return every released folder (on rank 0; [] elsewhere).

    ``make_source(sites)`` opens a source holding only those sites (e.g. a
    :class:`~saescope.store.StoreReader` over them: the rank reads only its sites' shards).  For
    results bit-identical to one process training every spec, the source must give the same
    batches whatever sites it holds (pass the store reader the ``buffer_tokens`` a reader of all
    the sites would use).  ``trainer_kwargs`` go to each rank's :class:`Trainer`.
    """
    env = env or current()
    out_dir = Path(out_dir)
    assignment = assign_specs(specs, env.world_size, d_in=d_in, split_sites=split_sites)
    check_layout(out_dir, {"mode": "site", "world_size": env.world_size,
                           "ranks": [[s.name for s in group] for group in assignment]}, env)
    mine = assignment[env.rank]
    if mine:
        sites = sorted({s.site for s in mine})
        trainer_kwargs["progress"] = trainer_kwargs.get("progress", True) and env.is_main
        Trainer(make_source(sites), mine, recipe, rank_dir(out_dir, env.rank), **trainer_kwargs).fit()
    return finish_split_run(out_dir, env)


def finish_split_run(out_dir: Path, env: DistEnv) -> list[Path]:
    """Every rank: wait for all to finish; rank 0 merges the ranks' releases and summaries."""
    barrier("waiting for every rank to finish training", patient=True)
    folders = merge_rank_runs(out_dir, env.world_size) if env.is_main else []
    barrier("waiting for rank 0 to collect the released SAEs", patient=True)
    return folders


def agree_on_start_step(ckpt_root: Path, *, has_state: bool, env: DistEnv) -> int:
    """The step every rank resumes from: the smallest of the ranks' last checkpoints.

    A rank killed between two ranks' checkpoint writes leaves the others one checkpoint ahead;
    they step back to the common one (their previous checkpoint, kept by ``keep_checkpoints`` ≥ 2)
    so that every rank asks for the same batches.  Ranks without SAEs (``has_state=False``) abstain.
    """
    ckpt = CheckpointDir(ckpt_root)
    latest = ckpt.latest() if has_state else None
    none = 2**62
    mine = (latest[0] if latest else 0) if has_state else none
    start = int(all_reduce_(torch.tensor([mine], dtype=torch.int64), "min", what="agreeing on the step to resume from"))
    start = 0 if start == none else start
    if has_state and mine > start:
        pointer = ckpt.root / "latest.json"
        if start == 0:
            pointer.unlink()
        else:
            folder = ckpt.root / f"step_{start:09d}"  # CheckpointDir's layout
            if not (folder / "state.json").exists():
                raise RuntimeError(
                    f"{env}: the other ranks resume from step {start}, but this rank no longer has that "
                    f"checkpoint ({folder}); start over in a new output folder"
                )
            write_json_atomic(pointer, {"step": start, "dir": folder.name})
    return start


def fit_distributed(mode: str, source: BatchSource, specs: list[SAESpec], recipe: Recipe, out_dir, *,
                    n_steps: int, online: bool, env: DistEnv | None = None, **trainer_kwargs) -> list[Path]:
    """What ``saescope train`` runs under torchrun.  ``mode``: ``"site"``, ``"data"`` or ``"latent"``.

    ``source`` is the :class:`~saescope.store.StoreReader` over the run's sites (from a store),
    or this rank's :class:`~saescope.stream.OnlineSource` over its :func:`corpus_share` (online).
    Site-parallel ranks re-open the store over their own sites with the full reader's bucket
    size, so they see the batches a single process would.  Returns the released folders (rank 0).
    """
    env = env or current()
    if mode not in ("site", "data", "latent"):
        raise ValueError(f"unknown parallel mode {mode!r}: use site, data or latent")
    kw = dict(trainer_kwargs, n_steps=n_steps)
    if mode == "latent":
        if online:
            raise ValueError("latent parallelism trains from an activation store (every rank reads the same "
                             "batches): harvest first, or use --parallel site/data online")
        from saescope.train.latent_parallel import train_latent_parallel

        return train_latent_parallel(source, specs, recipe, out_dir, env=env, **kw)
    if online:
        from saescope.train.online_parallel import train_online_site_parallel

        if mode == "site":
            return train_online_site_parallel(source, specs, recipe, out_dir, env=env, **kw)
        return DataParallelTrainer(source, specs, recipe, out_dir, env=env, split_batches=False, **kw).fit()
    if mode == "site":
        from saescope.store import StoreReader

        store, buffer = source.store, source.buffer_tokens
        return train_site_parallel(lambda sites: StoreReader(store, sites, buffer_tokens=buffer), specs, recipe,
                                   out_dir, d_in=source.d_in, env=env, **kw)
    return DataParallelTrainer(source, specs, recipe, out_dir, env=env, **kw).fit()


__all__ = [
    "DataParallelTrainer", "LocalShare", "NullLog", "RankSlice", "agree_on_start_step", "check_layout",
    "check_not_split", "finish_split_run", "fit_distributed", "merge_rank_runs", "rank_dir", "train_site_parallel",
]
