"""How one process takes part in a training run, as a small object the trainer is given.

The trainer asks its plan four things: how to build an SAE, how to reduce gradients (after
backward) and the input-scale sums (before step 0), how many rows of each batch it trains on, and
whether this rank writes the log, checkpoints and the release.  :class:`TrainPlan` itself is the
single-process answer; the parallel modes (:mod:`saescope.distributed.plans`) are other answers,
so the trainer has one code path and no subclass overrides its steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saescope.sae.base import SAE, SAEConfig


@dataclass
class TrainPlan:
    """One process trains every SAE on whole batches and writes everything."""

    #: ``SAEConfig -> SAE``; None: the architecture registry (:func:`saescope.sae.registry.build_sae`)
    build_sae: Callable[[SAEConfig], SAE] | None = None
    #: called with each SAE after backward, before its gradients are read (data parallelism)
    reduce_grads: Callable[[SAE], None] | None = None
    #: sums, in place, the float64 vector of per-site Σ‖x‖² and the row count of the scale estimate
    reduce_sums: Callable[[torch.Tensor], None] | None = None
    #: this rank trains on ``batch_size // rows_divisor`` rows of each batch
    rows_divisor: int = 1
    #: this rank writes the metrics log, shows progress and releases
    writes: bool = True
    #: this rank writes checkpoints (of its own state)
    checkpoints: bool = True
    #: what the run's identity (``checkpoints/run.json``) adds for this plan
    identity: dict[str, Any] = field(default_factory=dict)

    def make_sae(self, cfg: SAEConfig) -> SAE:
        if self.build_sae is not None:
            return self.build_sae(cfg)
        from saescope.sae.registry import build_sae

        return build_sae(cfg)

    def local_source(self, source):
        """The source this rank reads (its slice of each batch, under data parallelism)."""
        return source

    def rows_per_step(self, batch_size: int) -> int:
        if batch_size % self.rows_divisor:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.rows_divisor} data-parallel ranks")
        return batch_size // self.rows_divisor

    def finish(self, trainers: list) -> None:
        """After the last step: bring what the release needs onto the writing rank."""
