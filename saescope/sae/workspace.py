"""Reusable batch×width buffers for the fused JumpReLU and BatchTopK steps, and their shared checks.

A training step at batch 4,096 and width 16,384 needs a few 268 MB scratch tensors (the
pre-activations, then the latent gradient).  Allocating them afresh every step costs more than
the arithmetic done in them on a CPU: the allocator hands large blocks back to the operating
system, so each step page-faults its scratch memory in again (measured: a 4096×640 @ 640×16384
fp32 matmul takes ~290 ms into a fresh tensor and ~215 ms into a reused one; in bf16 78 vs 34 ms).

So the step borrows its scratch from one process-wide pool, shared by every SAE (54 SAEs of one
width need one set of buffers, not 54).  A set is *leased* for as long as the autograd graph of
the step that filled it may still read it: the lease is held by the step's autograd context and
released at the end of its backward (or when the graph is freed without a backward).  A second
forward while a lease is out simply gets another set, so interleaved forwards stay correct.
"""

from __future__ import annotations

import threading
import weakref

import torch


class Lease:
    """Exclusive use of one buffer set, until :meth:`release` or until it is garbage-collected."""

    __slots__ = ("__weakref__", "_buffers", "released")

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self._buffers = buffers
        self.released = False

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer ``name`` (allocated on first use; contents are whatever was left in it)."""
        if self.released:
            raise RuntimeError(
                "JumpReLU step buffers were already released: backward was run twice through the "
                "same graph (retain_graph=True is not supported by the fused step)"
            )
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def release(self) -> None:
        self.released = True


class BufferPool:
    """Buffer sets keyed by (device, batch, width); at most ``max_idle`` idle sets are kept."""

    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._lock = threading.Lock()
        # each entry: [key, buffers dict, weakref to the current lease or None]; most recent last
        self._entries: list[list] = []

    @staticmethod
    def _idle(entry: list) -> bool:
        lease = entry[2]() if entry[2] is not None else None
        return lease is None or lease.released

    def acquire(self, key: tuple) -> Lease:
        with self._lock:
            chosen = None
            for entry in self._entries:
                if entry[0] == key and self._idle(entry):
                    chosen = entry
                    break
            if chosen is None:
                chosen = [key, {}, None]
            else:
                self._entries.remove(chosen)
            self._entries.append(chosen)
            lease = Lease(chosen[1])
            chosen[2] = weakref.ref(lease)
            idle = [e for e in self._entries if e is not chosen and self._idle(e)]
            for entry in idle[: max(0, len(idle) - self.max_idle)]:
                self._entries.remove(entry)  # oldest idle sets go first
            return lease

    def clear(self) -> None:
        """Drop every idle buffer set (leased ones stay until their step is done)."""
        with self._lock:
            self._entries = [e for e in self._entries if not self._idle(e)]

    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for e in self._entries for t in e[1].values())


#: the pool every JumpReLU SAE in this process borrows from
POOL = BufferPool()


def step_precision(x_BD: torch.Tensor, W_enc_DF: torch.Tensor) -> tuple[str, torch.dtype | None]:
    """A fused step's checks and precision: refuses a batch that is not (B, d_in); returns the
    device type and the 16-bit dtype its products run in under ``torch.autocast`` (None: fp32)."""
    if x_BD.ndim != 2 or x_BD.shape[1] != W_enc_DF.shape[0]:
        raise ValueError(f"expected a batch of shape (B, {W_enc_DF.shape[0]}), got {tuple(x_BD.shape)}")
    device_type = x_BD.device.type
    if not torch.is_autocast_enabled(device_type):
        return device_type, None
    dtype = torch.get_autocast_dtype(device_type)
    return device_type, dtype if dtype in (torch.bfloat16, torch.float16) else None
