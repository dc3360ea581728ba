"""Latent-parallel training: SAEs too wide for one device, their latents split over the ranks.

Every rank reads the same batches (the source is replicated, as in Gemma Scope's tensor
parallelism) and holds 1/W of each SAE's latents (:class:`~saescope.sae.sharded.ShardedJumpReLUSAE`);
each step all-reduces the B×D partial reconstructions and ``b_dec``'s gradient.  The rank's
:class:`~saescope.train.trainer.Trainer` checkpoints its own shards under ``<out>/ranks/rank_<r>``
(a relaunch steps every rank back to their common checkpoint); at the end the shards are
gathered on rank 0 and released as ordinary, whole SAEs in ``<out>/release``.

Per step and SAE, each rank sends about 2·B·D·4 bytes (75 MB for B = 4,096, D = 2,304) whatever
the width, while data parallelism would all-reduce the 2·D·F·4-byte gradient (19 GB at 1M
latents): for wide SAEs, splitting latents is the only plan whose traffic does not grow with F.
"""

from __future__ import annotations

from pathlib import Path

from saescope.batches import BatchSource
from saescope.sae.base import SAE, SAEConfig
from saescope.sae.sharded import ShardedJumpReLUSAE
from saescope.train.distributed import DistEnv, current
from saescope.train.parallel import (
    NullLog,
    agree_on_start_step,
    check_layout,
    finish_split_run,
    rank_dir,
)
from saescope.train.recipe import Recipe
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer


def _reduce_shard_grads(sae: SAE) -> None:
    sae.reduce_grads()


class LatentParallelTrainer(Trainer):
    """:class:`Trainer` over latent-sharded JumpReLU SAEs; arguments as :class:`Trainer`."""

    def __init__(self, source: BatchSource, specs: list[SAESpec], recipe: Recipe | None, out_dir, *,
                 env: DistEnv | None = None, **kwargs):
        self.env = env or current()
        other = sorted({s.architecture for s in specs} - {"jumprelu"})
        if other:
            raise ValueError(f"latent parallelism is implemented for JumpReLU SAEs only, not {', '.join(other)}")
        for spec in specs:
            if spec.d_sae % self.env.world_size:
                raise ValueError(f"{spec.name}: {spec.d_sae} latents do not split evenly over {self.env.world_size} ranks")
        if "build_sae" in kwargs or "reduce_grads" in kwargs:
            raise TypeError("LatentParallelTrainer builds its SAEs and reduces their gradients itself")
        kwargs["progress"] = kwargs.get("progress", True) and self.env.is_main
        super().__init__(source, specs, recipe, rank_dir(out_dir, self.env.rank), build_sae=self._build_shard,
                         reduce_grads=_reduce_shard_grads, **kwargs)
        self.run_dir = Path(out_dir)

    def _build_shard(self, cfg: SAEConfig) -> ShardedJumpReLUSAE:
        return ShardedJumpReLUSAE(cfg, rank=self.env.rank, world_size=self.env.world_size)

    def run_identity(self) -> dict:
        return {**super().run_identity(), "latent_shard": [self.env.rank, self.env.world_size]}

    def _open_log(self, start: int):
        return super()._open_log(start) if self.env.is_main else NullLog()

    def fit(self) -> list[Path]:
        check_layout(self.run_dir, {"mode": "latent", "world_size": self.env.world_size,
                                    "saes": [s.name for s in self.specs]}, self.env)
        agree_on_start_step(self.out_dir / "checkpoints", has_state=True, env=self.env)
        super().fit()
        return finish_split_run(self.run_dir, self.env)

    def _release(self) -> list[Path]:
        """Gather every SAE (and its firing counters) on rank 0, which releases whole SAEs."""
        whole = []
        for t in self.trainers:
            whole.append((t.sae.gather_full(dst=0), t.sae.gather_latents(t.tokens_since_fired_F, 0, dst=0)))
        if not self.env.is_main:
            return []
        for t, (sae, since) in zip(self.trainers, whole):
            t.sae, t.tokens_since_fired_F = sae, since
        return super()._release()


def train_latent_parallel(source: BatchSource, specs: list[SAESpec], recipe: Recipe | None, out_dir, *,
                          env: DistEnv | None = None, **trainer_kwargs) -> list[Path]:
    """Train ``specs`` with their latents split over the ranks; every rank reads the same
    ``source``.  Returns the released folders on rank 0 ([] elsewhere)."""
    return LatentParallelTrainer(source, specs, recipe, out_dir, env=env, **trainer_kwargs).fit()
