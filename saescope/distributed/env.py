"""This process among the ranks torchrun started: the process group, its environment, and
errors that say which rank failed doing what.

Processes are started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) and talk through ``torch.distributed`` (NCCL between GPUs,
gloo between CPU processes); a failed rank is reported by torchrun's elastic agent, which stops
the others.  Our side adds what the agent cannot know: every collective that fails (because a
peer died) is re-raised naming this rank, what it was doing and how to resume
(:class:`CollectiveError`).  Outside torchrun everything here is rank 0 of 1 and no process group
exists, so the same code runs with and without a launcher.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

#: what torchrun exports to every worker; a process that has some but not all of them was
#: started by something else, and guessing the missing ones would hang the job
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: test hook: ``rank=1,step=5[,at=batch|shard][,mode=raise|kill]`` makes that rank fail there
FAILURE_VAR = "SAESCOPE_INJECT_FAILURE"


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: "nccl", "gloo" or None (a single process: no process group)
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


_ENV = DistEnv()
#: a gloo group whose barriers wait for days: ranks that finish their share early wait there
#: for the slowest one (a dead rank still ends the job at once: torchrun stops the others)
_PATIENT_GROUP = None
PATIENT_TIMEOUT = timedelta(days=7)


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun (or anything exporting torchrun's variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:<local rank>`` when CUDA is available, else CPU; ``"cuda"`` → this
    process's GPU; anything else as given."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was asked for but CUDA is not available")
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} wants GPU {device.index} but only {torch.cuda.device_count()} are "
                "visible: --nproc-per-node must not exceed the GPUs of a node"
            )
    return device


def init_distributed(device: str | torch.device = "auto", *, backend: str | None = None,
                     timeout_s: float = 1800.0, required: bool = False) -> DistEnv:
    """Join the process group torchrun set up (or stay a single process) and return where we stand.

    Outside torchrun this returns rank 0 of 1 and creates no process group, so the same code runs
    with and without a launcher.  Backend: NCCL for CUDA devices, gloo for CPU.  ``timeout_s``
    bounds how long a collective waits for a peer that neither answers nor dies.  ``required``:
    refuse to run as a single process (a command given ``--distributed`` outside torchrun).
    """
    global _ENV, _PATIENT_GROUP
    if required and not launched_by_torchrun() and not dist.is_initialized():
        raise RuntimeError(
            "--distributed needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT): launch with e.g. torchrun --nproc-per-node 2 -m saescope ..."
        )
    if not launched_by_torchrun() and not dist.is_initialized():
        _ENV = DistEnv(device=resolve_device(device))
        return _ENV
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"distributed launch is missing the environment variable(s) {', '.join(missing)}: "
                "start saescope with torchrun (e.g. torchrun --nproc-per-node 2 -m saescope ...)"
            )
        try:
            rank, world, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        except ValueError:
            raise RuntimeError(
                "RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, got "
                + ", ".join(f"{v}={os.environ[v]!r}" for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
            ) from None
        if world < 1 or not 0 <= rank < world:
            raise RuntimeError(f"inconsistent launch: RANK={rank} with WORLD_SIZE={world}")
    dev = resolve_device(device, local_rank)
    if dist.is_initialized():
        chosen = dist.get_backend()
    else:
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}
        if not available.get(chosen, True):
            raise RuntimeError(f"torch.distributed backend {chosen!r} is not available in this PyTorch build")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        with collective(f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                        DistEnv(rank, world, local_rank, dev, chosen)):
            dist.init_process_group(chosen, timeout=timedelta(seconds=timeout_s))
    _ENV = DistEnv(rank, world, local_rank, dev, chosen)
    if _PATIENT_GROUP is None:
        with collective("creating the end-of-work group"):
            _PATIENT_GROUP = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return _ENV


def shutdown() -> None:
    """Leave the process group (call at the end of a distributed command)."""
    global _ENV, _PATIENT_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _ENV, _PATIENT_GROUP = DistEnv(device=_ENV.device), None


def current() -> DistEnv:
    """The environment set by :func:`init_distributed` (rank 0 of 1 before it is called)."""
    return _ENV


# --- collectives that say what went wrong --------------------------------------------------


class CollectiveError(RuntimeError):
    """A collective failed, almost always because another rank died or hung."""


@contextmanager
def collective(what: str, env: DistEnv | None = None) -> Iterator[None]:
    """Re-raise a failed collective as :class:`CollectiveError` naming this rank and ``what``."""
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as err:
        env = env or _ENV
        raise CollectiveError(
            f"{env}: {what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Another rank probably stopped (torchrun's summary names the first one to fail); fix the cause "
            "and relaunch the same command to resume from the last checkpoint"
        ) from err


def patient_group():
    """The gloo group whose barriers wait for days (None in a single process)."""
    return _PATIENT_GROUP


# --- failure injection (tests) -----------------------------------------------------------------


def maybe_inject_failure(step: int, where: str = "batch", env: DistEnv | None = None) -> None:
    """Fail on purpose when ``SAESCOPE_INJECT_FAILURE`` names this rank, ``step`` and ``where``.

    The value is ``rank=R,step=K[,at=batch|shard][,mode=raise|kill]``: ``at`` says which counter
    ``step`` refers to (training batches, the default, or harvest shard groups); ``raise``
    (default) raises an error that torchrun's agent reports with its traceback; ``kill`` sends this
    process SIGKILL, as the out-of-memory killer or a lost node would.  The tests use it to check
    that a failed rank stops the job with a clear report and that a relaunch resumes.
    """
    value = os.environ.get(FAILURE_VAR)
    if not value:
        return
    try:
        spec = dict(item.split("=", 1) for item in value.split(","))
        target_rank, target_step = int(spec["rank"]), int(spec["step"])
        target_where, mode = spec.get("at", "batch"), spec.get("mode", "raise")
        if target_where not in ("batch", "shard") or mode not in ("raise", "kill"):
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(f"{FAILURE_VAR}={value!r}: expected rank=R,step=K[,at=batch|shard][,mode=raise|kill]") from None
    env = env or _ENV
    if env.rank != target_rank or step != target_step or where != target_where:
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{env}: injected failure at {where} {step} ({FAILURE_VAR}={value})")
