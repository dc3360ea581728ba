"""Train an EleutherAI sparsify TopK SAE on stored activations, with sparsify's own defaults.

Runs in the sparsify virtual environment (``bash scripts/peer-envs.sh``)::

    /work/peers/sparsify/bin/python benchmarks/peers/train_sparsify.py --acts ACTS.npy \
        --arch topk --width 2048 --k 50 --batch-size 4096 --tokens 262144 --out OUT.npz \
        [--seed 0] [--threads 2]

sparsify trains inside forward hooks of a language model, so the activations are served by a
stand-in "model": its input ids are row numbers of ``ACTS.npy`` (one token per sequence) and its
one hooked submodule outputs those rows.  sparsify's own ``Trainer`` (``TrainConfig`` defaults
otherwise: its signum + schedule-free optimiser and learning-rate rule, b_dec set to the first
batch's mean, unit-norm decoder with the parallel gradient removed, FVU loss, no AuxK) then
trains a ``SparseCoder`` on the first ``--tokens`` rows, in order, batch after batch.  Only the
width (``num_latents``), k, batch size and token count are set here.

The SAE sparsify saves at the end of ``fit`` (with the schedule-free optimiser in eval mode,
i.e. the averaged weights) is loaded with ``SparseCoder.load_from_disk`` and converted to
saescope's release convention acting on raw activations (``OUT.npz``)::

    pre = x @ W_enc + b_enc,  f = the k largest of relu(pre),  x_hat = f @ W_dec + b_dec

where sparsify's encoder on (x - b_dec) is folded into b_enc.  The conversion is checked on
1,024 rows against sparsify's own encode/decode and printed with the train-set FVU (about the
mean) and L0.  sparsify has no JumpReLU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LIBRARY = "sparsify"


# ---------------------------------------------------------------- shared with train_saelens.py
# (each script runs in its own virtual environment, so the helpers are repeated there)


def parse_args(argv: list[str] | None, *, archs: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


# ---------------------------------------------------------------- sparsify


class StoredActivations(torch.nn.Module):
    """A stand-in for a language model: ``input_ids`` (B, 1) are row numbers of the activation
    array, and the submodule ``acts`` (the hookpoint) outputs those rows as (B, 1, d_in)."""

    def __init__(self, acts: np.ndarray):
        super().__init__()
        self.rows = acts
        self.acts = torch.nn.Identity()
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> torch.nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, **_):
        ids = input_ids.flatten().numpy()
        a, b = int(ids.min()), int(ids.max()) + 1
        if b - a == ids.size and (np.diff(ids) == 1).all():  # a batch of consecutive rows
            x = np.array(self.rows[a:b])
        else:
            x = np.array(self.rows[ids])
        return self.acts(torch.from_numpy(x).reshape(*input_ids.shape, -1))


class RowIds(torch.utils.data.Dataset):
    """Rows 0..n-1, one single-token "sequence" each: ``{"input_ids": tensor([row])}``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, archs=("topk",))
    if args.l0_coefficient is not None:
        print("note: --l0-coefficient is ignored for topk")
    torch.set_num_threads(args.threads)
    acts, steps = open_acts(args.acts, args.tokens, args.batch_size)
    d_in = acts.shape[1]

    os.environ.setdefault("TQDM_DISABLE", "1")
    import sparsify
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    model = StoredActivations(acts)
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SaeConfig(num_latents=args.width, k=args.k),
            batch_size=args.batch_size,  # "sequences" of one token each
            hookpoints=["acts"],
            init_seeds=[args.seed],
            log_to_wandb=False,
            save_dir=save_dir,
            run_name="run",
        )
        config = cfg.to_dict()
        lr = cfg.lr or 5e-3 / (args.width / 2**14) ** 0.5  # the signum default in Trainer.__init__
        print(f"sparsify {sparsify.__version__}: SparseCoder d_in={d_in} num_latents={args.width} k={args.k}, "
              f"{steps} steps x {args.batch_size}; optimizer={cfg.optimizer} lr={lr:.3g}"
              f"{' (auto: 5e-3 / sqrt(F / 2^14))' if cfg.lr is None else ''}, "
              f"auxk_alpha={cfg.auxk_alpha}, normalize_decoder={cfg.sae.normalize_decoder}", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, RowIds(steps * args.batch_size), model)
        trainer.fit()
        seconds = time.perf_counter() - t0
        print(f"trained {trainer.global_step} steps, {steps * args.batch_size} tokens in {seconds:.1f} s "
              f"({steps * args.batch_size / seconds:,.0f} tokens/s)", flush=True)
        # What sparsify saves (and a user loads): the schedule-free eval-mode weights.
        sae = SparseCoder.load_from_disk(Path(save_dir) / "run" / "acts")
    sae.eval()
    if sae.cfg.transcode or sae.W_skip is not None or sae.cfg.activation != "topk":
        raise SystemExit("only plain TopK autoencoders are converted")

    with torch.no_grad():
        W_enc = sae.encoder.weight.detach().T.contiguous()  # (d_in, F)
        b_dec = sae.b_dec.detach().clone()
        b_enc = sae.encoder.bias.detach() - b_dec @ W_enc  # sparsify encodes (x - b_dec)
        W_dec = sae.W_dec.detach().clone()  # (F, d_in)
        p = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}

        x = torch.from_numpy(np.array(acts[:1024]))
        top_acts, top_idx, _ = sae.encode(x)
        f_peer = torch.zeros(x.shape[0], args.width).scatter_(-1, top_idx, top_acts)
        xhat_peer = sae.decode(top_acts, top_idx)
        ok = check_fold(p, "topk", args.k, x, f_peer, xhat_peer)

    fvu, l0 = train_metrics(p, "topk", args.k, acts, steps * args.batch_size)
    print(f"train FVU {fvu:.4f}  L0 {l0:.1f}  (topk, {LIBRARY}, {Path(args.acts).name})")
    write_npz(args.out, p, arch="topk", k=args.k, seconds=seconds, tokens=steps * args.batch_size,
              steps=steps, library=LIBRARY, library_version=sparsify.__version__,
              config=json.dumps({**config, "lr_used": lr}, default=str), train_fvu=fvu, train_l0=l0,
              seed=args.seed)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
