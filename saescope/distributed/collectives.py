"""Collectives every parallel mode uses, each one failing with a message naming the rank and
what it was doing; and the data-parallel gradient all-reduce.

Single process: every function here is a no-op (or returns its input), so callers need no branch.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from saescope.distributed.env import DistEnv, collective, current, patient_group


def barrier(what: str = "barrier", *, patient: bool = False) -> None:
    """Wait for every rank (no-op in a single process).  ``patient``: wait for days, not the
    process group's timeout — for ranks that finished their share and wait for the others."""
    if not current().distributed:
        return
    with collective(what):
        if patient and patient_group() is not None:
            dist.barrier(group=patient_group())
        elif current().backend == "nccl":
            dist.barrier(device_ids=[current().device.index])
        else:
            dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum", what: str = "all-reduce") -> torch.Tensor:
    """In-place all-reduce (``"sum"``, ``"min"``, ``"max"``) on this process's device; returns it."""
    if not current().distributed:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    target = tensor if tensor.device == comm_device() else tensor.to(comm_device())
    with collective(what):
        dist.all_reduce(target, op=ops[op])
    if target is not tensor:
        tensor.copy_(target)
    return tensor


def comm_device() -> torch.device:
    """Where tensors must be for a collective: the GPU under NCCL, the CPU under gloo."""
    env = current()
    return env.device if env.backend == "nccl" else torch.device("cpu")


# --- data parallelism --------------------------------------------------------------------------


class GradAllReduce:
    """The ``reduce_grads`` hook of :class:`~saescope.train.sae_trainer.SAETrainer` under data
    parallelism: average every gradient over the ranks, in place, before anything reads them.

    Why averaging is exact: every rank's loss is a mean over its B local rows, so the mean of the
    W local gradients is the gradient of the mean over the W·B rows — the single-process loss on
    the global batch.  That includes JumpReLU's θ: its pseudo-gradient is a *sum* over the batch
    of kernel terms each carrying the 1/B of the batch mean, so it averages like every other
    gradient.  A parameter without a gradient (unused this step) all-reduces zeros, so every rank
    issues the same collectives in the same order.

    ``seconds`` and ``bytes`` accumulate the time spent in (and the payload of) the all-reduces,
    for the communication share reported by ``benchmarks/distributed.py``.
    """

    def __init__(self, env: DistEnv | None = None):
        self.env = env or current()
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0

    def __call__(self, module: torch.nn.Module) -> None:
        if not self.env.distributed:
            return
        start = time.perf_counter()
        device = None
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_(p.grad, "sum", what=f"all-reduce of {name}'s gradient")
            p.grad.div_(self.env.world_size)
            self.bytes += p.grad.numel() * p.grad.element_size()
            device = p.grad.device
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # NCCL is asynchronous: time the transfer, not its launch
        self.seconds += time.perf_counter() - start
        self.calls += 1
