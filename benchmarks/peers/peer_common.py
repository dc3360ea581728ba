"""Helpers the peer training scripts share (argument parsing, data, the fold check, the npz).

Imported by path from ``train_saelens.py`` and ``train_sparsify.py``: each runs in its own virtual
environment, and this module needs only numpy and torch, which both have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch



def parse_args(argv: list[str] | None, *, archs: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or "").split("\n\n")[0])
    p.add_argument("--acts", required=True, help="float32 .npy (N, d_in), rows already shuffled")
    p.add_argument("--arch", required=True, choices=archs)
    p.add_argument("--width", type=int, default=2048, help="number of latents F")
    p.add_argument("--k", type=int, default=50, help="active latents per token (topk)")
    p.add_argument("--l0-coefficient", type=float, default=None,
                   help="JumpReLU L0 coefficient lambda (default: the peer's own default)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=262144, help="training tokens (whole batches)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def open_acts(path: str, tokens: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The activation array (memory-mapped) and the number of whole training steps."""
    acts = np.load(path, mmap_mode="r")
    if acts.ndim != 2 or acts.dtype != np.float32:
        raise SystemExit(f"{path}: expected a float32 (N, d_in) array, got {acts.dtype} {acts.shape}")
    steps = tokens // batch_size
    if steps < 1:
        raise SystemExit(f"--tokens {tokens} is less than one batch of {batch_size}")
    if steps * batch_size > acts.shape[0]:
        raise SystemExit(f"{path} has {acts.shape[0]} rows, fewer than --tokens {steps * batch_size}")
    if steps * batch_size != tokens:
        print(f"note: --tokens {tokens} is not a multiple of the batch; training on {steps * batch_size}")
    return acts, steps


def batches(acts: np.ndarray, batch_size: int, steps: int):
    """The first ``steps`` batches of rows, in order, as float32 CPU tensors."""
    for i in range(steps):
        yield torch.from_numpy(np.array(acts[i * batch_size : (i + 1) * batch_size]))


def npz_encode(p: dict[str, torch.Tensor], x: torch.Tensor, arch: str, k: int) -> torch.Tensor:
    """saescope's release convention, on raw activations."""
    pre = x @ p["W_enc"] + p["b_enc"]
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > p["threshold"])
    vals, idx = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, vals)


def npz_decode(p: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    return f @ p["W_dec"] + p["b_dec"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_fold(p, arch, k, x, f_peer, xhat_peer, tol=1e-4) -> bool:
    """The npz formula, evaluated in float64 on the stored float32 arrays, against the peer's own
    float32 forward.  (Evaluated in float32 the raw-activation formula itself loses precision
    where the activations have a large mean, e.g. Gemma's resid_post: x @ W_enc and b_enc nearly
    cancel; that error is printed too but is not the fold's.)"""
    res = {}
    for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
        q = {n: t.to(dt) for n, t in p.items()}
        f = npz_encode(q, x.to(dt), arch, k)
        res[name] = (rel(f, f_peer), rel(npz_decode(q, f), xhat_peer),
                     float(((f != 0).sum(-1) != (f_peer != 0).sum(-1)).float().mean()))
    ef, ex, l0_diff = res["float64"]
    ok = ef < tol and ex < tol
    print(f"fold check on {x.shape[0]} rows, npz formula in float64 vs the peer's encode/decode: "
          f"rel|f - f_peer| = {ef:.2e}, rel|x_hat - x_hat_peer| = {ex:.2e}, rows with another L0: "
          f"{l0_diff:.4f} -> {'OK' if ok else 'FAILED'} (tolerance {tol:g}); npz formula in float32: "
          f"{res['float32'][0]:.2e}, {res['float32'][1]:.2e}, {res['float32'][2]:.4f}")
    return ok


@torch.no_grad()
def train_metrics(p, arch, k, acts, rows, chunk=8192) -> tuple[float, float]:
    """FVU about the mean and mean L0 of the npz SAE over the first ``rows`` training rows
    (computed in float64; see check_fold)."""
    q = {n: t.double() for n, t in p.items()}
    s1 = torch.zeros(acts.shape[1], dtype=torch.float64)
    s2 = err = l0 = 0.0
    for a in range(0, rows, chunk):
        x = torch.from_numpy(np.array(acts[a : min(rows, a + chunk)])).double()
        f = npz_encode(q, x, arch, k)
        err += float((npz_decode(q, f) - x).pow(2).sum())
        l0 += float((f != 0).sum())
        s1 += x.sum(0)
        s2 += float(x.pow(2).sum())
    total = s2 - float(s1.pow(2).sum()) / rows
    return err / total, l0 / rows


def write_npz(out: str, p: dict[str, torch.Tensor], *, arch: str, k: int, **extra) -> None:
    arrays = {name: t.detach().to(torch.float32).contiguous().numpy() for name, t in p.items()}
    arrays["architecture"] = np.array(arch)
    if arch == "topk":
        arrays["k"] = np.array(k, dtype=np.int64)
    for name, v in extra.items():
        arrays[name] = np.array(v)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)
