"""The parallel modes as :class:`~saescope.train.plan.TrainPlan` objects a trainer is given.

* :class:`DataParallelPlan`: every rank holds every SAE, trains on its slice of each global
  batch and averages gradients; rank 0 alone writes checkpoints, log and release, into ``<out>``
  exactly as a single process would.
* :class:`LatentParallelPlan`: SAEs too wide for one device, 1/W of each SAE's latents per rank
  (:class:`~saescope.sae.sharded.ShardedJumpReLUSAE`); every rank reads the same batches and
  checkpoints its own shards; at the end the shards are gathered on rank 0, which releases whole
  SAEs.  Per step and SAE a rank sends about 2·B·D·4 bytes whatever the width, where data
  parallelism would all-reduce the 2·D·F·4-byte gradient: for wide SAEs, the plan whose traffic
  does not grow with F.
"""

from __future__ import annotations


import torch

from saescope.activations.source import BatchSource
from saescope.distributed.collectives import GradAllReduce, all_reduce_
from saescope.distributed.env import DistEnv, current, maybe_inject_failure
from saescope.sae.base import SAE, SAEConfig
from saescope.train.plan import TrainPlan


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


def _sum(sums: torch.Tensor) -> None:
    all_reduce_(sums, "sum", what="summing the input-scale estimate")


class DataParallelPlan(TrainPlan):
    """Every SAE on every rank, gradients averaged (exact: see :class:`GradAllReduce`).

    ``split_batches=True`` (default): the source is read identically by every rank (a store) and
    each rank trains on its slice of each global batch, so the result equals one process with
    the global batch up to float rounding.  ``False``: each rank's source is its own data (online,
    the model on its share of the corpus) and yields B/W rows per step.  Every rank resumes from
    rank 0's checkpoint, which holds the state of all of them (it is the same on every rank).
    The logged metrics are rank 0's share of each batch; the released metrics cover every rank.
    """

    def __init__(self, env: DistEnv | None = None, *, split_batches: bool = True):
        self.env = env or current()
        self.split_batches = split_batches
        self.grad_reduce = GradAllReduce(self.env)
        W = self.env.world_size
        super().__init__(reduce_grads=self.grad_reduce, reduce_sums=_sum, rows_divisor=W,
                         writes=self.env.is_main, checkpoints=self.env.is_main,
                         # each rank's own data: the stream depends on the number of ranks
                         identity={} if split_batches else {"data_parallel_ranks": W})

    def local_source(self, source):
        return RankSlice(source, self.env) if self.split_batches else LocalShare(source, self.env)

    def finish(self, trainers: list) -> None:
        """Average the final metrics over the ranks; count every rank's tokens and firings."""
        W = self.env.world_size
        for t in trainers:
            all_reduce_(t.final_sums, "sum", what=f"summing {t.name}'s final metrics").div_(W)
            seen = torch.tensor([t.tokens_seen], dtype=torch.int64)
            t.tokens_seen = int(all_reduce_(seen, "sum", what="summing tokens seen"))
            # local rows since a latent last fired on this rank; fired anywhere = min over ranks
            all_reduce_(t.sae.tokens_since_fired_F, "min", what=f"merging {t.name}'s latent firing").mul_(W)
            if t.released_l0 is not None:  # each rank measured its share of the last batch
                l0 = torch.tensor([t.released_l0], dtype=torch.float64)
                t.released_l0 = float(all_reduce_(l0, "sum", what=f"averaging {t.name}'s L0")) / W


def _reduce_shard_grads(sae: SAE) -> None:
    sae.reduce_grads()


class LatentParallelPlan(TrainPlan):
    """Each JumpReLU SAE's latents split over the ranks; every rank reads the same batches."""

    def __init__(self, env: DistEnv | None = None):
        self.env = env or current()
        super().__init__(build_sae=self._build_shard, reduce_grads=_reduce_shard_grads, writes=self.env.is_main,
                         identity={"latent_shard": [self.env.rank, self.env.world_size]})

    def _build_shard(self, cfg: SAEConfig) -> SAE:
        from saescope.sae.sharded import ShardedJumpReLUSAE

        return ShardedJumpReLUSAE(cfg, rank=self.env.rank, world_size=self.env.world_size)

    def check(self, specs) -> None:
        other = sorted({s.architecture for s in specs} - {"jumprelu"})
        if other:
            raise ValueError(f"latent parallelism is implemented for JumpReLU SAEs only, not {', '.join(other)}")
        for spec in specs:
            if spec.d_sae % self.env.world_size:
                raise ValueError(f"{spec.name}: {spec.d_sae} latents do not split evenly over {self.env.world_size} ranks")

    def finish(self, trainers: list) -> None:
        """Gather every SAE (and its firing counters) on rank 0, which releases whole SAEs."""
        whole = [t.sae.gather_full(dst=0) for t in trainers]  # with its firing counter
        if self.env.is_main:
            for t, sae in zip(trainers, whole):
                t.sae = sae
