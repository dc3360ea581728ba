"""When a bfloat16 request runs in bfloat16, and when it runs in float32 instead.

Why: on a CPU without bf16 matrix units (AVX512-BF16 or AMX), PyTorch's bf16 matrix product
falls back to a slow kernel. Measured on 2 cores of an AVX2-only AMD EPYC (Zen 3): a 1,024 x 640
by 640 x 2,048 product takes 21 ms in float32 and 5.4 s in bf16, 250 times slower, and Gemma's
262k-word head runs 4.6 times slower. A bf16 preset would take days there instead of an hour. So on such a
CPU every bf16 request (training autocast, the loss forwards, the Fisher pass, the feature
shortlist) runs in float32, with one notice. float32 is the exact computation the bf16 one
approximates. ``SAESCOPE_CPU_BF16=1`` forces bf16 anyway, and ``=0`` refuses it on any CPU.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

ENV = "SAESCOPE_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively, read from /proc/cpuinfo's flags (a flag, not a
    timing, so the choice does not depend on the machine's load). False where it cannot be read."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_runs_natively(device: torch.device | str) -> bool:
    """True where a bf16 request should run in bf16 on ``device``: always off the CPU, and on a
    CPU with bf16 units (or when ``SAESCOPE_CPU_BF16=1``)."""
    if torch.device(device).type != "cpu":
        return True
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_bf16_units()


def effective_dtype(requested: str, device: torch.device | str) -> str:
    """The dtype name that will run for a ``requested`` one ('float32' or 'bfloat16') on ``device``."""
    if requested == "bfloat16" and not bf16_runs_natively(device):
        _notice_once()
        return "float32"
    return requested


def autocast_dtype(requested: str, device: torch.device | str) -> torch.dtype | None:
    """``torch.bfloat16`` for a bf16 request that runs natively, else None (plain float32)."""
    return torch.bfloat16 if effective_dtype(requested, device) == "bfloat16" else None


@functools.lru_cache(maxsize=1)
def _notice_once() -> None:
    print(f"saescope: this CPU has no bf16 matrix units (AVX512-BF16 or AMX), where bf16 runs ~100x slower: "
          f"bf16 settings run in float32 ({ENV}=1 forces bf16)", file=sys.stderr)
